# lrctl worker image: the demo by default, or your own training script.
#
#   docker build -t lrctl .
#   docker run --rm -p 127.0.0.1:50051:50051 -e LRCTL_ADMIN_TOKEN="$(cat admin.token)" lrctl
#
# The base is a PyTorch CUDA runtime image: torch comes from it and is not reinstalled
# (pip sees it through the venv's system site-packages and keeps it). A base without
# torch gets one from PyPI, or from a folder of wheels named by PIP_FIND_LINKS (the
# container test builds on a plain Debian base with a local CPU wheel that way).
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN python3 -m venv --system-site-packages /opt/lrctl
ENV PATH=/opt/lrctl/bin:$PATH

# Torch only when the base has none. From a wheel folder, the wheel file itself: pip
# would otherwise take the index's (CUDA, gigabytes) build when it is newer.
RUN if python -c "import torch" 2>/dev/null; then \
        python -c "import torch; print('torch', torch.__version__, 'from the base image')"; \
    elif [ -n "$PIP_FIND_LINKS" ] && ls "$PIP_FIND_LINKS"/torch-*.whl >/dev/null 2>&1; then \
        pip install "$(ls "$PIP_FIND_LINKS"/torch-*.whl | sort -V | tail -n 1)"; \
    else \
        pip install "torch>=2.6,<3"; \
    fi

COPY . /src
# The tested grpc/protobuf/regex versions; torch and numpy stay the base image's.
RUN grep -E '^(grpcio|grpcio-health-checking|grpcio-reflection|protobuf|regex)==' /src/constraints.txt > /tmp/constraints.txt \
 && torch_before="$(python -c 'import torch; print(torch.__version__)')" \
 && pip install -c /tmp/constraints.txt "/src[worker]" \
 && torch_after="$(python -c 'import torch; print(torch.__version__)')" \
 && test "$torch_before" = "$torch_after" \
 && rm -rf /src /tmp/constraints.txt \
 && lrctl --help >/dev/null

# uid 1000: a unix socket on a volume is reachable by the host user of the same uid
# (run with --user "$(id -u):$(id -g)" for another one).
RUN useradd --create-home --uid 1000 --shell /bin/sh lrctl \
 && mkdir -p /data /run/lrctl /app \
 && chown lrctl: /data /run/lrctl /app
USER lrctl
WORKDIR /app

# Where `lrctl health` (and any lrctl command in the container) connects; a worker
# started without --address listens here too. For a unix socket on a volume, set it to
# unix:/run/lrctl/worker.sock and start the worker without --address.
ENV LRCTL_ADDRESS=127.0.0.1:50051
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["lrctl", "health"]

ENTRYPOINT ["lrctl"]
# 0.0.0.0 needs a token (LRCTL_ADMIN_TOKEN or LRCTL_ADMIN_TOKEN_FILE) or TLS client
# certificates: the worker refuses to start without one and says how.
CMD ["demo", "--serve", "--address", "0.0.0.0:50051", "--model", "mlp"]

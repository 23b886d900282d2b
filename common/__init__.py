"""What the worker and the client share and neither side's transport leaks into:
the error vocabulary and the schedule definitions. Imports neither grpc nor torch."""

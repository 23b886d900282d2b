// A Node.js client of an lrctl worker: list the parameters, set one rate, read it back.
//
// The service and messages come from protos/lrctl/v1/lrctl.proto, loaded at run time by
// @grpc/proto-loader (no generated code, no lrctl Python code).
//
//   npm ci
//   LRCTL_TOKEN=... node client.js [ADDRESS [NAME VALUE]]
//
// ADDRESS defaults to $LRCTL_ADDRESS, else 127.0.0.1:50051; NAME to the first parameter
// and VALUE to twice its rate. LRCTL_TOKEN (if set) travels as `authorization: Bearer ...`.
// Plaintext, as the worker's loopback default; use grpc.credentials.createSsl() for TLS.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = process.env.LRCTL_PROTO ||
  path.join(__dirname, '..', '..', 'protos', 'lrctl', 'v1', 'lrctl.proto');

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 30000 }, (err, reply) =>
      err ? reject(err) : resolve(reply));
  });
}

async function main() {
  const address = process.argv[2] || process.env.LRCTL_ADDRESS || '127.0.0.1:50051';
  // keepCase: the proto's own field names; longs as strings (int64 steps and versions).
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
  });
  const lrctl = grpc.loadPackageDefinition(definition).lrctl.v1;
  const client = new lrctl.LearningRateControl(address, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (process.env.LRCTL_TOKEN) {
    metadata.set('authorization', `Bearer ${process.env.LRCTL_TOKEN}`);
  }
  try {
    const listed = await call(client, 'ListParameters', {}, metadata);
    for (const p of listed.parameters) {
      console.log(`${p.name}\t${p.lr}`);
    }
    const name = process.argv[3] || listed.parameters[0].name;
    const current = listed.parameters.find((p) => p.name === name);
    const value = process.argv[4] !== undefined ? Number(process.argv[4]) : 2 * (current ? current.lr : 0.001);
    const set = await call(client, 'SetLearningRates', {
      updates: [{ selector: name, mode: 'UPDATE_MODE_ABSOLUTE', value }],
      wait: true,
      reason: 'node client example',
    }, metadata);
    console.log(`set ${name}=${value}: applied=${set.applied} at step ${set.step} (version ${set.version})`);
    const read = await call(client, 'GetLearningRates', { selectors: [name] }, metadata);
    for (const r of read.rates) {
      console.log(`read back ${r.name}=${r.lr} (step ${read.step}, version ${read.version})`);
    }
  } catch (err) {
    console.error(`error: ${grpc.status[err.code] || err.code}: ${err.details || err.message}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();

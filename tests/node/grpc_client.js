#!/usr/bin/env node
// gRPC test client for kspan's end-to-end tests with @grpc/grpc-js (pure JavaScript HTTP/2 and
// HPACK, through Node's http2 module: another encoder than grpcio's C core). No generated code:
// messages are raw bytes.
//
// Usage: node grpc_client.js --port P --calls SPEC[,SPEC...] [--calls ...] [--traceparent V] [--wait]
//                            [--tls-ca CERT]
//
// Calls acc.Shop/GetItem of tests/servers/grpc_server.py on 127.0.0.1:P, in order, one call at a
// time, all on ONE client (one HTTP/2 connection). SPEC is one of
//
//   unary:ok        GetItem("ok"), expects OK
//   unary:internal  GetItem("internal"), expects INTERNAL
//   unary:notfound  GetItem("notfound"), expects NOT_FOUND
//   unary:slow      GetItem("slow") (0.2 s handler), expects OK
//   unary:deadline  GetItem("sleep") (2 s handler) with a 0.3 s deadline, expects DEADLINE_EXCEEDED
//
// --tls-ca CERT: TLS (Node's OpenSSL), trusting that PEM certificate.
// --traceparent V adds the metadata `traceparent: V` to every call. --wait prints READY and waits
// for a line on stdin before connecting (so a test can select this process in kspan first).
//
// Prints `CALL <index> <spec> <STATUS_NAME> <elapsed_ms>` per call, then `DONE <n>`. Exits 0 when
// every call got the status it expects, 1 otherwise (details on stderr).

'use strict';

const grpc = require('@grpc/grpc-js');

const UNARY = {
  ok: { request: 'ok', timeoutMs: null, expected: grpc.status.OK },
  internal: { request: 'internal', timeoutMs: null, expected: grpc.status.INTERNAL },
  notfound: { request: 'notfound', timeoutMs: null, expected: grpc.status.NOT_FOUND },
  slow: { request: 'slow', timeoutMs: null, expected: grpc.status.OK },
  deadline: { request: 'sleep', timeoutMs: 300, expected: grpc.status.DEADLINE_EXCEEDED },
};
// Deadline of every call but unary:deadline: a hung server fails the run.
const CALL_TIMEOUT_MS = 30000;

function usage(message) {
  process.stderr.write(`grpc_client.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { port: null, calls: [], traceparent: null, wait: false, tlsCa: null };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--port') args.port = Number(value());
    else if (arg === '--calls') {
      for (const spec of value().split(',')) {
        const s = spec.trim();
        if (!s) continue;
        const [kind, name] = s.split(':');
        if (kind !== 'unary' || !Object.hasOwn(UNARY, name)) usage(`unknown call spec ${s}`);
        args.calls.push(s);
      }
    } else if (arg === '--traceparent') args.traceparent = value();
    else if (arg === '--wait') args.wait = true;
    else if (arg === '--tls-ca') args.tlsCa = value();
    else usage(`unknown argument ${arg}`);
  }
  if (!Number.isInteger(args.port) || args.port <= 0) usage('--port P is required');
  if (args.calls.length === 0) usage('no calls given (--calls)');
  return args;
}

function waitForLine() {
  return new Promise((resolve) => {
    process.stdin.once('data', () => {
      process.stdin.pause();
      resolve();
    });
    process.stdin.once('end', resolve);
  });
}

function statusName(code) {
  return grpc.status[code] || `CODE_${code}`;
}

function unaryCall(client, spec, metadata) {
  const { request, timeoutMs, expected } = UNARY[spec.split(':')[1]];
  const started = process.hrtime.bigint();
  return new Promise((resolve) => {
    client.makeUnaryRequest(
      '/acc.Shop/GetItem',
      (buf) => buf,
      (buf) => buf,
      Buffer.from(request),
      metadata.clone(),
      { deadline: Date.now() + (timeoutMs ?? CALL_TIMEOUT_MS) },
      (err, reply) => {
        const elapsedMs = Number(process.hrtime.bigint() - started) / 1e6;
        const code = err ? err.code : grpc.status.OK;
        let problem = null;
        if (code !== expected) {
          problem = `status ${statusName(code)}, expected ${statusName(expected)}`;
        } else if (!err && !(reply && reply.equals(Buffer.from('item')))) {
          problem = `reply ${JSON.stringify(String(reply))}, expected "item"`;
        }
        resolve({ code, elapsedMs, problem });
      },
    );
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const metadata = new grpc.Metadata();
  if (args.traceparent) metadata.add('traceparent', args.traceparent);

  if (args.wait) {
    process.stdout.write('READY\n');
    await waitForLine();
  }

  const credentials = args.tlsCa
    ? grpc.credentials.createSsl(require('fs').readFileSync(args.tlsCa))
    : grpc.credentials.createInsecure();
  const client = new grpc.Client(`127.0.0.1:${args.port}`, credentials, {
    'grpc.enable_retries': 0,
    'grpc.enable_http_proxy': 0,
    'grpc.use_local_subchannel_pool': 1,
  });
  await new Promise((resolve) => {
    client.waitForReady(Date.now() + CALL_TIMEOUT_MS, (err) => {
      if (err) {
        process.stderr.write(`cannot connect to 127.0.0.1:${args.port}: ${err.message}\n`);
        process.exit(1);
      }
      resolve();
    });
  });

  const failures = [];
  for (const [index, spec] of args.calls.entries()) {
    const { code, elapsedMs, problem } = await unaryCall(client, spec, metadata);
    process.stdout.write(`CALL ${index} ${spec} ${statusName(code)} ${elapsedMs.toFixed(1)}\n`);
    if (problem) failures.push(`call ${index} (${spec}): ${problem}`);
  }
  client.close();
  process.stdout.write(`DONE ${args.calls.length}\n`);
  for (const failure of failures) process.stderr.write(`${failure}\n`);
  process.exitCode = failures.length ? 1 : 0;
}

main().catch((err) => {
  process.stderr.write(`grpc_client.js: ${err.stack || err}\n`);
  process.exit(1);
});

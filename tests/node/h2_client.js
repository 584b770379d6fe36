#!/usr/bin/env node
// Cleartext HTTP/2 (prior knowledge) client for kspan's end-to-end tests, with Node's built-in
// http2 module only: several requests on ONE connection. (curl 7.88's --http2-prior-knowledge
// cannot reuse a connection: its second request fails with "Error in the HTTP2 framing layer",
// curl issue 10634, fixed in curl 8.0.)
//
// Usage: node h2_client.js --port P --paths /a,/b,... [--concurrent] [--wait]
//
// GETs each path from http://127.0.0.1:P, one after the other (or all at once with
// --concurrent), on one session. --wait prints READY and waits for a line on stdin before
// connecting. Prints `LOCAL_PORT <port>`, then `RESP <index> <path> <status> <body length>` per
// request in the order given, then `DONE <n>`. Exits 0 when every request got a response.

'use strict';

const http2 = require('node:http2');

function usage(message) {
  process.stderr.write(`h2_client.js: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { port: null, paths: [], concurrent: false, wait: false };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--port') args.port = Number(value());
    else if (arg === '--paths') args.paths.push(...value().split(',').filter((p) => p));
    else if (arg === '--concurrent') args.concurrent = true;
    else if (arg === '--wait') args.wait = true;
    else usage(`unknown argument ${arg}`);
  }
  if (!Number.isInteger(args.port) || args.port <= 0) usage('--port P is required');
  if (args.paths.length === 0) usage('no paths given (--paths)');
  if (!args.paths.every((p) => p.startsWith('/'))) usage('every path must start with /');
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

function get(session, path) {
  return new Promise((resolve, reject) => {
    const req = session.request({ ':method': 'GET', ':path': path });
    let status = null;
    let length = 0;
    req.on('response', (headers) => {
      status = headers[':status'];
    });
    req.on('data', (chunk) => {
      length += chunk.length;
    });
    req.on('end', () => resolve({ status, length }));
    req.on('error', reject);
    req.end();
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  if (args.wait) {
    process.stdout.write('READY\n');
    await waitForLine();
  }
  const session = http2.connect(`http://127.0.0.1:${args.port}`);
  session.on('error', (err) => {
    process.stderr.write(`h2_client.js: session error: ${err.message}\n`);
    process.exit(1);
  });
  await new Promise((resolve) => session.once('connect', resolve));
  process.stdout.write(`LOCAL_PORT ${session.socket.localPort}\n`);

  let results;
  if (args.concurrent) {
    results = await Promise.all(args.paths.map((path) => get(session, path)));
  } else {
    results = [];
    for (const path of args.paths) results.push(await get(session, path));
  }
  results.forEach(({ status, length }, index) => {
    process.stdout.write(`RESP ${index} ${args.paths[index]} ${status} ${length}\n`);
  });
  await new Promise((resolve) => session.close(resolve));
  process.stdout.write(`DONE ${results.length}\n`);
}

main().catch((err) => {
  process.stderr.write(`h2_client.js: ${err.stack || err}\n`);
  process.exit(1);
});

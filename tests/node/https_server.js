// HTTPS server for the kspan end-to-end tests: Node's own `https` (OpenSSL linked into the node
// executable, its TLS sockets on memory BIOs).
//
// Usage: node https_server.js CERT KEY
// Listens on 127.0.0.1 (port 0), prints `PORT <n>` once listening. Routes: GET /ok → 200 "ok\n",
// anything else → 404. Keep-alive as Node's default.
'use strict';

const fs = require('fs');
const https = require('https');

const [cert, key] = process.argv.slice(2);
if (!cert || !key) {
  process.stderr.write('usage: node https_server.js CERT KEY\n');
  process.exit(2);
}

const server = https.createServer(
  { cert: fs.readFileSync(cert), key: fs.readFileSync(key) },
  (req, res) => {
    if (req.method === 'GET' && req.url.split('?')[0] === '/ok') {
      res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': 3 });
      res.end('ok\n');
    } else {
      res.writeHead(404, { 'Content-Type': 'text/plain', 'Content-Length': 10 });
      res.end('not found\n');
    }
  },
);
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(`PORT ${server.address().port}\n`);
});
process.on('SIGTERM', () => process.exit(0));

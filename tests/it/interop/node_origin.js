// Interop origin on Node's own servers: `https` (HTTP/1.1, WebSocket echo) on PORT_H1 and
// `http2` (h2 only) on PORT_H2. Every request is recorded as one JSON line in LOG: what this
// origin received (method, path, version, headers, body size and sha256).
'use strict';
const fs = require('fs');
const https = require('https');
const http2 = require('http2');
const crypto = require('crypto');

const tls = { cert: fs.readFileSync(process.env.CERT), key: fs.readFileSync(process.env.KEY) };
const log = fs.openSync(process.env.LOG, 'a');
const PATTERN = Buffer.alloc(64 * 1024, 'interop-');

function record(req, extra) {
  const line = JSON.stringify(Object.assign({
    method: req.method, path: req.url, version: req.httpVersion, headers: req.headers,
  }, extra)) + '\n';
  fs.writeSync(log, line);
}

function download(res, total) {
  res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': total });
  let left = total;
  const pump = () => {
    while (left > 0) {
      const chunk = left >= PATTERN.length ? PATTERN : PATTERN.subarray(0, left);
      left -= chunk.length;
      if (!res.write(chunk)) { res.once('drain', pump); return; }
    }
    res.end();
  };
  pump();
}

function handle(req, res) {
  const url = new URL(req.url, 'https://origin');
  const hash = crypto.createHash('sha256');
  let bytes = 0;
  req.on('data', (c) => { bytes += c.length; hash.update(c); });
  req.on('end', () => {
    const sha256 = hash.digest('hex');
    record(req, { bytes, sha256 });
    switch (url.pathname) {
      case '/echo': {
        const body = JSON.stringify({ version: req.httpVersion, headers: req.headers });
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
        res.end(body);
        break;
      }
      case '/chunked':
        // No length: HTTP/1.1 answers chunked.
        res.writeHead(200, { 'content-type': 'text/plain' });
        res.write('part-1;');
        setTimeout(() => { res.write('part-2;'); res.end('part-3'); }, 50);
        break;
      case '/trailers':
        res.writeHead(200, { 'content-type': 'text/plain', trailer: 'x-checksum' });
        res.write('with trailers');
        res.addTrailers({ 'x-checksum': 'sha-interop-1' });
        res.end();
        break;
      case '/sse': {
        // One event at once, then one every 300 ms: a client that sees the first event
        // long before the last proves the proxy streams. Event 2 echoes x-api-key.
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
        let n = 0;
        const send = () => {
          n += 1;
          const data = n === 2 ? `key=${req.headers['x-api-key'] || ''}` : `event-${n}`;
          res.write(`data: ${data}\n\n`);
          if (n < 5) setTimeout(send, 300); else res.end();
        };
        send();
        break;
      }
      case '/upload': {
        const body = JSON.stringify({ bytes, sha256, expect: req.headers.expect || null });
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(body);
        break;
      }
      case '/download':
        download(res, Number(url.searchParams.get('bytes') || 0));
        break;
      default:
        res.writeHead(404, { 'content-type': 'text/plain' });
        res.end('not found');
    }
  });
}

// RFC 6455 echo: text and binary frames come back unmasked; close is answered and ends it.
function websocket(req, socket) {
  record(req, { bytes: 0, upgrade: true });
  const accept = crypto.createHash('sha1')
    .update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11')
    .digest('base64');
  socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
    `Sec-WebSocket-Accept: ${accept}\r\n\r\n`);
  if (req.url.includes('greet')) {
    // A hostile upstream's move: hand the unsealed x-api-key back in the first text frame.
    const text = Buffer.from(`key=${req.headers['x-api-key'] || ''}`);
    socket.write(Buffer.concat([Buffer.from([0x81, text.length]), text]));
  }
  let buf = Buffer.alloc(0);
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      if (buf.length < 2) return;
      const op = buf[0] & 0x0f;
      let len = buf[1] & 0x7f;
      let off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
      const masked = (buf[1] & 0x80) !== 0;
      const mask = masked ? buf.subarray(off, off + 4) : null;
      if (masked) off += 4;
      if (buf.length < off + len) return;
      const payload = Buffer.from(buf.subarray(off, off + len));
      if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
      buf = buf.subarray(off + len);
      const head = payload.length < 126 ? Buffer.from([0x80 | op, payload.length])
        : Buffer.from([0x80 | op, 126, payload.length >> 8, payload.length & 0xff]);
      socket.write(Buffer.concat([head, payload]));
      if (op === 0x8) { socket.end(); return; }
    }
  });
  socket.on('error', () => {});
}

const h1 = https.createServer(tls, handle);
h1.on('upgrade', websocket);
h1.listen(Number(process.env.PORT_H1), '127.0.0.1');
const h2 = http2.createSecureServer(tls, handle);
h2.listen(Number(process.env.PORT_H2), '127.0.0.1');
Promise.all([h1, h2].map((s) => new Promise((r) => s.on('listening', r))))
  .then(() => console.log('READY'));

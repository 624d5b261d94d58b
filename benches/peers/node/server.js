#!/usr/bin/env node
// Peer: a Node.js server with built-in modules only, as a Node user would write it.
//
//   node server.js --listen 127.0.0.1:8080 [--admin 127.0.0.1:8081] [--workers N] [--root DIR]
//
// --workers 0 (default): one process with `http`. --workers N: Node's `cluster` module with N
// workers sharing the port (default round-robin scheduling), the primary only supervises.
//
// Routes: GET /            Hello, World!
//         GET /healthz     ok
//         GET /sleep?ms=N  answers after N ms (timer keeps running if the client leaves)
//         GET /expensive/:key?ms=N
//                          a backend call of N ms (default 200) behind an in-process
//                          single-flight: concurrent requests for one key share one call
//         GET /static/*    a file under --root via fs.createReadStream().pipe(res)
// Admin (--admin, served by the primary or the single process): GET /stats -> JSON counters
// summed over workers: backend_calls, wasted_ms (sleep work finished after its client left).
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');
const fs = require('node:fs');
const path = require('node:path');

const MAX_MS = 60000;

function parseArgs(argv) {
  const args = { listen: '127.0.0.1:3004', admin: null, workers: 0, root: null };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i].replace(/^--/, '');
    const value = argv[++i];
    if (!(key in args) || value === undefined) {
      console.error(`unknown or incomplete option ${argv[i - 1]}`);
      process.exit(2);
    }
    args[key] = key === 'workers' ? Number(value) : value;
  }
  return args;
}

function hostPort(addr) {
  const i = addr.lastIndexOf(':');
  return { host: addr.slice(0, i), port: Number(addr.slice(i + 1)) };
}

const args = parseArgs(process.argv.slice(2));
const counters = { backend_calls: 0, wasted_ms: 0 };

// Counters live in each process; workers report increments to the primary.
function count(name, n) {
  if (cluster.isWorker) process.send({ count: name, n });
  else counters[name] += n;
}

function serveAdmin() {
  if (!args.admin) return;
  const { host, port } = hostPort(args.admin);
  http.createServer((req, res) => {
    if (req.url === '/stats') {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(counters));
    } else {
      res.writeHead(404);
      res.end();
    }
  }).listen(port, host);
}

function msParam(url, dflt) {
  const q = url.searchParams.get('ms');
  if (q === null) return dflt;
  const ms = Number(q);
  if (!Number.isInteger(ms) || ms < 0 || ms > MAX_MS) return NaN;
  return ms;
}

// One in-flight promise per key; every request for that key while it runs awaits the same one.
const inflight = new Map();
let generation = 0;
function backendCall(key, ms) {
  let p = inflight.get(key);
  if (!p) {
    count('backend_calls', 1);
    const gen = ++generation;
    p = new Promise((resolve) => setTimeout(() => resolve(JSON.stringify({ key, generation: gen })), ms));
    p.finally(() => inflight.delete(key));
    inflight.set(key, p);
  }
  return p;
}

function text(res, status, body) {
  res.writeHead(status, { 'content-type': 'text/plain' });
  res.end(body);
}

function handler(req, res) {
  const url = new URL(req.url, 'http://localhost');
  if (req.method !== 'GET') return text(res, 405, 'method not allowed');
  if (url.pathname === '/') return text(res, 200, 'Hello, World!');
  if (url.pathname === '/healthz') return text(res, 200, 'ok');
  if (url.pathname === '/sleep') {
    const ms = msParam(url, 0);
    if (Number.isNaN(ms)) return text(res, 400, 'bad ms');
    setTimeout(() => {
      if (res.destroyed || req.socket.destroyed) count('wasted_ms', ms);
      else text(res, 200, 'slept');
    }, ms);
    return;
  }
  if (url.pathname.startsWith('/expensive/')) {
    const key = decodeURIComponent(url.pathname.slice('/expensive/'.length));
    const ms = msParam(url, 200);
    if (!key || Number.isNaN(ms)) return text(res, 400, 'bad key or ms');
    backendCall(key, ms).then((body) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(body);
    });
    return;
  }
  if (url.pathname.startsWith('/static/') && args.root) {
    const root = path.resolve(args.root);
    const file = path.resolve(root, '.' + decodeURIComponent(url.pathname.slice('/static'.length)));
    if (!file.startsWith(root + path.sep)) return text(res, 403, 'forbidden');
    fs.stat(file, (err, st) => {
      if (err || !st.isFile()) return text(res, 404, 'not found');
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': st.size });
      const stream = fs.createReadStream(file);
      stream.on('error', () => res.destroy());
      stream.pipe(res);
    });
    return;
  }
  text(res, 404, 'not found');
}

function serve() {
  const { host, port } = hostPort(args.listen);
  const server = http.createServer(handler);
  server.keepAliveTimeout = 5000;
  server.listen(port, host);
}

if (args.workers > 0 && cluster.isPrimary) {
  serveAdmin();
  for (let i = 0; i < args.workers; i++) cluster.fork();
  cluster.on('message', (_worker, msg) => {
    if (msg && msg.count in counters) counters[msg.count] += msg.n;
  });
  cluster.on('exit', () => {
    // A benchmark peer: a dying worker is a failed run, not something to hide by restarting.
    console.error('a worker exited; stopping');
    process.exit(1);
  });
} else {
  if (!cluster.isWorker) serveAdmin();
  serve();
}

process.on('SIGTERM', () => process.exit(0));

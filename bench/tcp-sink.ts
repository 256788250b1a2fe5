import { createServer } from 'node:net';

/*
 * The raw loopback TCP baseline's receiving process (forked by bench/migration.ts): accepts
 * connections, counts bytes read as Node delivers them, reports { port } then { done } once
 * `bytes` have arrived.
 */
process.once('message', ({ bytes }: { bytes: number }) => {
  let received = 0;
  const server = createServer((socket) => {
    socket.on('data', (chunk: Buffer) => {
      received += chunk.length;
      if (received >= bytes) process.send!({ done: true }, () => process.exit(0));
    });
  });
  server.listen(0, '127.0.0.1', () => {
    const address = server.address();
    process.send!({ port: typeof address === 'object' && address !== null ? address.port : 0 });
  });
});

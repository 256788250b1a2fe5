import { connect } from 'node:net';

/*
 * The raw loopback TCP baseline's receiving process (forked by bench/migration.ts). It connects
 * `connections` sockets to the sender's port and reads `bytes` in all, then reports { done, cpuMs }
 * (its CPU time from the first connection to the last byte). Two ways to read:
 *   'count'   Node's default: each read lands in a fresh buffer from Node ('data' events), counted
 *             and dropped;
 *   'memory'  into one prefaulted buffer of `bytes`, each connection filling its own part of it in
 *             order (`onread`), as a migration destination fills guest RAM.
 *
 *   → { bytes, port, connections, mode }   ← { ready }   … ← { done, cpuMs }
 */

export interface SinkRequest {
  bytes: number;
  port: number;
  connections: number;
  mode: 'count' | 'memory';
}

const READ_BYTES = 512 * 1024;

process.once('message', ({ bytes, port, connections, mode }: SinkRequest) => {
  let received = 0;
  let cpuSince: NodeJS.CpuUsage | undefined;
  const count = (n: number) => {
    received += n;
    if (received < bytes) return;
    const { user, system } = process.cpuUsage(cpuSince);
    process.send!({ done: true, cpuMs: (user + system) / 1000 }, () => process.exit(0));
  };
  const memory = mode === 'memory' ? Buffer.allocUnsafeSlow(bytes).fill(1) : undefined;
  const share = Math.ceil(bytes / connections);
  for (let c = 0; c < connections; c++) {
    const start = c * share;
    const end = Math.min(bytes, start + share);
    let at = start;
    const onConnect = () => void (cpuSince ??= process.cpuUsage());
    if (memory === undefined) {
      connect({ host: '127.0.0.1', port }, onConnect).on('data', (chunk: Buffer) => count(chunk.length));
      continue;
    }
    const onread = {
      // The rest of this connection's share, at most READ_BYTES of it. Node asks for a buffer after
      // every read, the last one too, and must never get an empty one.
      buffer: () => {
        const from = Math.min(at, end - 1);
        return memory.subarray(from, Math.min(from + READ_BYTES, end));
      },
      callback: (n: number) => {
        at += n;
        count(n);
        return true;
      },
    };
    connect({ host: '127.0.0.1', port, onread }, onConnect);
  }
  process.send!({ ready: true });
});

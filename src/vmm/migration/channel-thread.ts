import { connect, type Socket } from 'node:net';
import { parentPort } from 'node:worker_threads';
import type { FromChannelThread, RamJobResult, ToChannelThread } from './channel-thread-protocol.js';
import { RamPacketBuilder } from './ram-scan.js';

/**
 * A channel thread (see channel-thread-protocol.ts): connects and writes the sockets of the
 * multifd channels the main thread gives it. A destination never writes on a multifd channel:
 * bytes from it cut the connection.
 */

const port = parentPort!;
const sockets = new Map<number, Socket>();
let ramBlocks: RamPacketBuilder[] = [];
const post = (message: FromChannelThread) => port.postMessage(message);

function open(channel: number, host: string, portNumber: number, timeoutMs: number): void {
  const socket = connect({ host, port: portNumber, noDelay: true });
  let opened = false;
  const timer = setTimeout(() => {
    socket.destroy();
    post({ op: 'refused', channel, message: `no connection in ${timeoutMs} ms`, timedOut: true });
  }, timeoutMs);
  socket.once('connect', () => {
    clearTimeout(timer);
    opened = true;
    sockets.set(channel, socket);
    post({ op: 'opened', channel });
  });
  socket.on('error', (err) => {
    clearTimeout(timer);
    if (opened) post({ op: 'failed', channel, message: err.message });
    else post({ op: 'refused', channel, message: err.message, timedOut: false });
  });
  socket.on('close', () => {
    sockets.delete(channel);
    if (opened) post({ op: 'closed', channel });
  });
  socket.on('data', () => socket.destroy());
}

function send(channel: number, seq: number, pieces: Uint8Array[]): void {
  const socket = sockets.get(channel);
  const bytes = pieces.reduce((n, p) => n + p.length, 0);
  // Gone already: the bytes are let go (the 'closed' message tells the main thread why).
  if (socket === undefined || socket.destroyed) {
    post({ op: 'sent', channel, seq, bytes });
    return;
  }
  writeBatch(socket, pieces, () => post({ op: 'sent', channel, seq, bytes }));
}

/** Write `pieces` in one batch (one writev); `done` once the kernel has them all. */
function writeBatch(socket: Socket, pieces: readonly Uint8Array[], done: () => void): void {
  socket.cork();
  pieces.forEach((piece, i) => socket.write(piece, i === pieces.length - 1 ? done : undefined));
  socket.uncork();
}

/**
 * A ram job: every dirty page of the bitmap words [fromWord, toWord) of a block, as packets
 * written in one batch, reported once the kernel has them all.
 */
function sendRam(channel: number, seq: number, block: number, fromWord: number, toWord: number): void {
  const socket = sockets.get(channel);
  const result: RamJobResult = { frames: 0, bytes: 0, normalPages: 0, zeroPages: 0 };
  const done = () => post({ op: 'ram-sent', channel, seq, ...result });
  // Gone already: nothing is sent (the 'closed' message tells the main thread why).
  if (socket === undefined || socket.destroyed) {
    done();
    return;
  }
  const builder = ramBlocks[block]!;
  const range = { word: fromWord, end: toWord };
  const pieces: Uint8Array[] = [];
  for (let packet = builder.next(range); packet !== undefined; packet = builder.next(range)) {
    pieces.push(packet.header, ...packet.body);
    result.frames++;
    result.bytes += packet.bytes;
    result.normalPages += packet.normalPages;
    result.zeroPages += packet.zeroPages;
  }
  if (pieces.length === 0) done();
  else writeBatch(socket, pieces, done);
}

port.on('message', (message: ToChannelThread) => {
  switch (message.op) {
    case 'open':
      open(message.channel, message.host, message.port, message.timeoutMs);
      break;
    case 'send':
      send(message.channel, message.seq, message.pieces);
      break;
    case 'ram-setup':
      ramBlocks = message.blocks.map((shared, index) => new RamPacketBuilder(index, shared));
      break;
    case 'ram':
      sendRam(message.channel, message.seq, message.block, message.fromWord, message.toWord);
      break;
    case 'end':
      sockets.get(message.channel)?.end();
      break;
    case 'close':
      sockets.get(message.channel)?.destroy();
      break;
  }
});

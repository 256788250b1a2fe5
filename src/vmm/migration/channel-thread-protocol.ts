/*
 * Messages between the source's main thread and a channel thread (channel-thread.ts), which owns
 * the sockets of some multifd channels and does their writes (QEMU's multifd send threads): the
 * kernel's copy of every byte then runs beside the main thread's bitmap scans and device reads.
 *
 *   main → thread   open  { channel, host, port, timeoutMs }   connect a channel's socket
 *                   send  { channel, seq, pieces }              one frame; pieces over a
 *                                                               SharedArrayBuffer are shared, others copied
 *                   end   { channel }                           finish writing, then FIN
 *                   close { channel }                           cut the connection now
 *   thread → main   opened { channel } | refused { channel, message, timedOut }
 *                   sent   { channel, seq, bytes }              the socket has handed the frame to the kernel
 *                   failed { channel, message }                 the socket failed; closed { channel }
 */

export type ToChannelThread =
  | { op: 'open'; channel: number; host: string; port: number; timeoutMs: number }
  | { op: 'send'; channel: number; seq: number; pieces: Uint8Array[] }
  | { op: 'end'; channel: number }
  | { op: 'close'; channel: number };

export type FromChannelThread =
  | { op: 'opened'; channel: number }
  | { op: 'refused'; channel: number; message: string; timedOut: boolean }
  | { op: 'sent'; channel: number; seq: number; bytes: number }
  | { op: 'failed'; channel: number; message: string }
  | { op: 'closed'; channel: number };

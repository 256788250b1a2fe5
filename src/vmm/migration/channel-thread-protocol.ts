import type { SharedRamBlock } from './ram-scan.js';

/*
 * Messages between the source's main thread and a channel thread (channel-thread.ts), which owns
 * the sockets of some multifd channels and does their writes (QEMU's multifd send threads): the
 * kernel's copy of every byte then runs beside the main thread's bitmap scans and device reads.
 *
 *   main → thread   open      { channel, host, port, timeoutMs }  connect a channel's socket
 *                   ram-setup { blocks }                        the RAM blocks' shared bitmaps and memory
 *                   send      { channel, seq, pieces }          one frame; pieces over a
 *                                                               SharedArrayBuffer are shared, others copied
 *                   ram       { channel, seq, block, fromWord, toWord }
 *                                                               build RAM_PAGES packets from the dirty
 *                                                               pages of these bitmap words (clearing
 *                                                               them) and send them
 *                   end       { channel }                       finish writing, then FIN
 *                   close     { channel }                       cut the connection now
 *   thread → main   opened { channel } | refused { channel, message, timedOut }
 *                   sent   { channel, seq, bytes }              the socket has handed the frame to the kernel
 *                   ram-sent { channel, seq, frames, bytes, normalPages, zeroPages }
 *                                                               ditto for a ram job's packets
 *                   failed { channel, message }                 the socket failed; closed { channel }
 *
 * Messages on one port arrive in order, so a frame sent after a ram job follows its packets.
 */

export type ToChannelThread =
  | { op: 'open'; channel: number; host: string; port: number; timeoutMs: number }
  | { op: 'ram-setup'; blocks: SharedRamBlock[] }
  | { op: 'send'; channel: number; seq: number; pieces: Uint8Array[] }
  | { op: 'ram'; channel: number; seq: number; block: number; fromWord: number; toWord: number }
  | { op: 'end'; channel: number }
  | { op: 'close'; channel: number };

/** What a ram job sent. */
export interface RamJobResult {
  frames: number;
  bytes: number;
  normalPages: number;
  zeroPages: number;
}

export type FromChannelThread =
  | { op: 'opened'; channel: number }
  | { op: 'refused'; channel: number; message: string; timedOut: boolean }
  | { op: 'sent'; channel: number; seq: number; bytes: number }
  | ({ op: 'ram-sent'; channel: number; seq: number } & RamJobResult)
  | { op: 'failed'; channel: number; message: string }
  | { op: 'closed'; channel: number };

import type { ErrnoName } from '../../uapi/errno.js';
import { VfioError } from '../../uapi/error.js';
import type { MigFeatureFlags } from '../../uapi/migration.js';

/**
 * What a device migration driver implements: the single arcs of the v2 state machine and the
 * bytes of its sessions. The VFIO core (VfioDevice) does every check, walks multi-step paths,
 * owns the data streams, their lifetimes and all errno behaviour; a driver only does the work.
 *
 * Arcs map to hooks like this (P2P devices use the quiesce hooks, others never see them):
 *
 *   RUNNING → STOP, RUNNING_P2P → STOP            stop()
 *   STOP → RUNNING                                start(false)
 *   STOP → RUNNING_P2P                            start(true)
 *   RUNNING ↔ RUNNING_P2P, PRE_COPY ↔ PRE_COPY_P2P  setP2pQuiesced(true | false)
 *   RUNNING(_P2P) → PRE_COPY(_P2P)                startSaving({ precopy: true })   (device keeps running)
 *   STOP → STOP_COPY                              startSaving({ precopy: false })  (device stopped)
 *   PRE_COPY(_P2P) → STOP_COPY                    session.enterStopCopy()          (device stops)
 *   PRE_COPY → RUNNING, PRE_COPY_P2P → RUNNING_P2P,
 *   STOP_COPY → STOP                              session.end()  (run state unchanged)
 *   STOP → RESUMING                               startResuming()
 *   RESUMING → STOP                               sink.finish(), then sink.end()
 *
 * A hook that throws leaves the device in the arc's from-state (for session.end() and
 * sink.end() too: the session then stays open), unless it throws an ArcBrokeDevice, which puts the
 * device in ERROR and ends every session. Hooks must not throw anything but VfioError; anything
 * else is treated as a broken device too.
 *
 * VFIO_DEVICE_RESET: the core ends every open session (end()), then calls reset(); a reset() that
 * throws leaves the device in ERROR. Errors of stopCopyLength() and of the session's read(),
 * precopyInfo() and write() fail that call only; they never change the device state.
 */
export interface MigrationDriver {
  /** Device type name, carried in its migration data (`accel`, `nic`, …). */
  readonly deviceType: string;
  /** VFIO_MIGRATION_* flags; STOP_COPY is mandatory. */
  readonly migrationFlags: MigFeatureFlags;
  /** True when the device has its own DMA dirty tracker (DMA_LOGGING_* features). */
  readonly dmaLogging: boolean;

  stop(): void;
  start(p2pQuiesced: boolean): void;
  setP2pQuiesced(quiesced: boolean): void;
  startSaving(options: { precopy: boolean; dataReady: () => void }): SavingSession;
  startResuming(): ResumingSession;
  /** MIG_DATA_SIZE: bytes still needed to complete STOP_COPY from the current state (an estimate). */
  stopCopyLength(): bigint;
  /** VFIO_DEVICE_RESET: back to the power-on state, running. */
  reset(): void;
}

export interface PrecopyInfo {
  initialBytes: bigint;
  dirtyBytes: bigint;
}

export interface SavingSession {
  /**
   * Copy the next bytes of the stream into `target`, return how many. 0 means nothing now: a
   * temporary end in precopy (the core returns ENOMSG) or the end of data in stop-copy.
   */
  read(target: Uint8Array): number;
  /** Only called in PRE_COPY/PRE_COPY_P2P. */
  precopyInfo(): PrecopyInfo;
  /** PRE_COPY(_P2P) → STOP_COPY: stop the device; the same stream goes on with the final state. */
  enterStopCopy(): void;
  /** The session is over (state left the saving group, reset, close): release everything. */
  end(): void;
}

export interface ResumingSession {
  /** Append stream bytes in order. May throw on data that can never load (bad header, …). */
  write(chunk: Uint8Array): void;
  /** RESUMING → STOP: validate and load everything written; throw VfioError if it cannot. */
  finish(): void;
  end(): void;
  /**
   * Optional single-copy write: hand `fill` a view of where the next stream bytes belong (device
   * memory, for a payload), let it write n bytes there, then take them exactly as write() would.
   * Returns n. Without it, ResumeStream.writeFrom() stages bytes and calls write().
   */
  writeFrom?(fill: (target: Uint8Array) => number): number;
}

/** Thrown by a driver hook that could neither complete its arc nor restore the from-state. */
export class ArcBrokeDevice extends VfioError {
  constructor(errno: ErrnoName, message: string) {
    super(`VFIO_${errno}`, message, { errno });
  }
}

/**
 * What a migration reports, shaped as QEMU's query-migrate (MigrationInfo) with the names in
 * camelCase and units in the names. The same object is the payload of progress events while the
 * migration runs and the final report when it ends.
 */

/** QEMU's MigrationStatus values that a precopy migration with VFIO devices goes through. */
export type MigrationStatus =
  'none' | 'setup' | 'active' | 'device' | 'completed' | 'failed' | 'cancelling' | 'cancelled';

/** Which side of a migration reports. */
export type MigrationRole = 'source' | 'destination';

/** The part of the migration a failure happened in. */
export type MigrationPhase =
  | 'connect'
  | 'handshake'
  | 'setup'
  | 'precopy'
  | 'switchover'
  | 'stop-copy'
  | 'load'
  | 'hand-off'
  | 'cleanup';

export interface RamStats {
  /** Bytes of RAM pages and page headers sent (received on a destination). */
  transferredBytes: number;
  /** Bytes of RAM still dirty (the last sync's count minus what has been sent since). */
  remainingBytes: number;
  /** Guest RAM size. */
  totalBytes: number;
  /** Zero pages, sent as an offset only ("duplicate" in QEMU). */
  duplicatePages: number;
  /** Pages sent with their data. */
  normalPages: number;
  normalBytes: number;
  /** Pages dirtied per second, measured between syncs at least 1 s apart. */
  dirtyPagesRate: number;
  /** Throughput of the last 100 ms slot, megabits per second. */
  mbps: number;
  /** Dirty-log syncs so far: the iteration count. */
  dirtySyncCount: number;
  pageSizeBytes: number;
  /** RAM bytes that went over multifd channels. */
  multifdBytes: number;
  pagesPerSecond: number;
  /** Bytes sent while the VM ran / while it was stopped. */
  precopyBytes: number;
  downtimeBytes: number;
}

export interface DeviceMigrationStats {
  name: string;
  type: string;
  /** The device's VFIO migration state now ('PRE_COPY', …). */
  state: string;
  /** Device data bytes sent during precopy (main channel). */
  precopyBytes: number;
  /** Device state bytes sent at switchover (multifd packets, config included). */
  stopCopyBytes: number;
  /** Device-state packets sent (source) or loaded (destination). */
  packets: number;
  /** Initial bytes / dirty bytes the device last reported in precopy. */
  initialBytes: number;
  dirtyBytes: number;
}

export interface ChannelStats {
  /** 0 = the main channel, 1.. = multifd channels. */
  index: number;
  kind: 'main' | 'multifd';
  /** Bytes written to (source) or read from (destination) the socket. */
  bytes: number;
}

export interface MigrationInfo {
  role: MigrationRole;
  vm: string;
  status: MigrationStatus;
  /** Milliseconds since the migration started (until it ended, once it has). */
  totalTimeMs: number;
  /** Duration of the setup step. */
  setupTimeMs: number;
  /** VM stop to completion (source measurement); set once completed. */
  downtimeMs: number | undefined;
  /** Estimate while active: bytes dirty at the last sync / bandwidth. */
  expectedDowntimeMs: number | undefined;
  /** auto-converge's vCPU throttle now, %. */
  cpuThrottlePercentage: number;
  /** Bandwidth of the last slot, bytes per millisecond; switchover threshold = this × downtime-limit. */
  bandwidthBytesPerMs: number;
  thresholdBytes: number;
  /** Has the destination acked the devices' initial data (switchover-ack)? */
  switchoverAcked: boolean;
  ram: RamStats;
  /** Device bytes of every kind ("vfio.transferred" in QEMU). */
  vfio: { transferredBytes: number };
  devices: DeviceMigrationStats[];
  channels: ChannelStats[];
  /** Bytes of device state queued out of order on a destination (and the most it reached). */
  queuedBuffers: { bytes: number; peakBytes: number; capBytes: number } | undefined;
  /** The failure of a 'failed' migration ("error-desc"), with where it happened. */
  error: MigrationErrorInfo | undefined;
}

export interface MigrationErrorInfo {
  code: string;
  message: string;
  phase: MigrationPhase;
  device: string | undefined;
  errno: string | undefined;
}

/** Events while a migration runs (typed, in order). */
export type MigrationEvent =
  | { type: 'status'; status: MigrationStatus; info: MigrationInfo }
  /** About every 100 ms while active, and at each phase change. */
  | { type: 'progress'; info: MigrationInfo }
  /** A dirty-log sync finished (QEMU's MIGRATION_PASS). */
  | { type: 'pass'; iteration: number; dirtyBytes: number }
  /** A device entered a VFIO migration state (QEMU's VFIO_MIGRATION event). */
  | { type: 'device-state'; device: string; state: string }
  /** auto-converge changed the vCPU throttle. */
  | { type: 'throttle'; percent: number }
  /** The migration ended: completed, failed or cancelled; `info` is the final report. */
  | { type: 'end'; info: MigrationInfo };

/** Empty RAM statistics for a VM of `totalBytes`. */
export function emptyRamStats(totalBytes: number, pageSizeBytes: number): RamStats {
  return {
    transferredBytes: 0,
    remainingBytes: totalBytes,
    totalBytes,
    duplicatePages: 0,
    normalPages: 0,
    normalBytes: 0,
    dirtyPagesRate: 0,
    mbps: 0,
    dirtySyncCount: 0,
    pageSizeBytes,
    multifdBytes: 0,
    pagesPerSecond: 0,
    precopyBytes: 0,
    downtimeBytes: 0,
  };
}

/** Is this a status a migration ends in? */
export function isFinalStatus(status: MigrationStatus): boolean {
  return status === 'completed' || status === 'failed' || status === 'cancelled';
}

import {
  FEATURE_HEADER_BYTES,
  FeatureFlag,
  FeatureId,
  FeaturePayloadBytes,
} from '../../uapi/device-feature.js';
import { internalError, kernelError, VfioError } from '../../uapi/error.js';
import {
  isMigState,
  MIG_FEATURE_ALL,
  MigFeature,
  MigState,
  migStateName,
  stateSupported,
} from '../../uapi/migration.js';
import {
  DirtyPageLog,
  type DmaLoggingControl,
  type DmaLoggingReport,
  loggingReportArgsValid,
  reportBitmapBytes,
  validateLoggingReport,
  validateLoggingStart,
} from './dma-logging.js';
import type { DmaPort } from './dma-port.js';
import { asKernelError, ResumeStream, SavingStream } from './mig-data-stream.js';
import { nextMigrationState } from './mig-fsm.js';
import {
  ArcBrokeDevice,
  type MigrationDriver,
  type ResumingSession,
  type SavingSession,
} from './migration-driver.js';

/** A data fd as MIG_DEVICE_STATE returns it: a stream object, or -1 for none. */
export type DataFdValue = SavingStream | ResumeStream | -1;

/** `struct vfio_device_feature_mig_state`; SET reads deviceState, both write back. */
export interface MigStateData {
  deviceState: number;
  dataFd: DataFdValue;
}

/**
 * One VFIO_DEVICE_FEATURE call. `flags` is the raw flags word (feature id | GET/SET/PROBE);
 * `argsz` defaults to the header plus the feature's struct; `data` stands for the payload and is
 * written back in place, as the kernel writes the user's struct.
 */
export interface DeviceFeatureCall {
  flags: number;
  argsz?: number;
  data?: unknown;
}

const { GET, SET, PROBE, MASK } = FeatureFlag;
const KNOWN_FLAGS = MASK | GET | SET | PROBE;

/** What vfio_check_feature() decided: 'probe' = return 0 without doing anything. */
type FeatureCheck = 'probe' | 'do';

/**
 * A VFIO device with a migration driver: the VFIO core of drivers/vfio/vfio_main.c (feature
 * validation, MIG_DEVICE_STATE walking, DMA logging checks) plus the driver-side bookkeeping every
 * v2 driver repeats (mlx5's state mutex loop, data fd lifetimes, reset).
 */
export class VfioDevice {
  readonly name: string;
  readonly driver: MigrationDriver;
  readonly dma: DmaPort | undefined;
  #state: MigState = MigState.RUNNING;
  #saving: { session: SavingSession; stream: SavingStream } | undefined;
  #resuming: { session: ResumingSession; stream: ResumeStream } | undefined;
  #dirtyLog: DirtyPageLog | undefined;
  #unobserve: (() => void) | undefined;
  #closed = false;

  constructor(options: { name: string; driver: MigrationDriver; dma?: DmaPort }) {
    this.name = options.name;
    this.driver = options.driver;
    this.dma = options.dma;
    const flags = this.driver.migrationFlags;
    // vfio-pci-core refuses to register migration ops without STOP_COPY (or with unknown bits).
    if (flags !== 0 && ((flags & MigFeature.STOP_COPY) === 0 || (flags & ~MIG_FEATURE_ALL) !== 0)) {
      throw kernelError('EINVAL', `invalid migration flags 0x${flags.toString(16)}`, {
        target: this.name,
        op: 'register',
      });
    }
    if (this.driver.dmaLogging && !this.dma) {
      throw kernelError('EINVAL', 'DMA logging needs a DMA port', { target: this.name, op: 'register' });
    }
  }

  /** The current migration state, as MIG_DEVICE_STATE GET reports it. */
  get state(): MigState {
    return this.#state;
  }

  get hasMigration(): boolean {
    return this.driver.migrationFlags !== 0;
  }

  /** VFIO_DEVICE_FEATURE, with the kernel's validation order. */
  deviceFeature(call: DeviceFeatureCall): void {
    const where = { target: this.name, op: 'VFIO_DEVICE_FEATURE' };
    this.#checkOpen(where.op);
    const { flags } = call;
    const argsz = call.argsz ?? FEATURE_HEADER_BYTES + defaultPayloadBytes(flags & MASK);
    if (argsz < FEATURE_HEADER_BYTES) throw kernelError('EINVAL', `argsz ${argsz} below 8`, where);
    // flags is a u32: anything that is not one (bits above 31, fractions) has unknown bits.
    if (!Number.isInteger(flags) || flags < 0 || flags > 0xffffffff || (flags & ~KNOWN_FLAGS) !== 0) {
      throw kernelError('EINVAL', 'unknown flag bits', where);
    }
    if (!(flags & PROBE) && flags & SET && flags & GET) {
      throw kernelError('EINVAL', 'GET and SET together need PROBE', where);
    }
    const payload = argsz - FEATURE_HEADER_BYTES;
    switch (flags & MASK) {
      case FeatureId.MIGRATION:
        this.#featureMigration(flags, payload, call.data);
        break;
      case FeatureId.MIG_DEVICE_STATE:
        this.#featureMigState(flags, payload, call.data);
        break;
      case FeatureId.MIG_DATA_SIZE:
        this.#featureDataSize(flags, payload, call.data);
        break;
      case FeatureId.DMA_LOGGING_START:
        this.#featureLoggingStart(flags, payload, call.data);
        break;
      case FeatureId.DMA_LOGGING_STOP:
        this.#featureLoggingStop(flags, payload);
        break;
      case FeatureId.DMA_LOGGING_REPORT:
        this.#featureLoggingReport(flags, payload, call.data);
        break;
      default:
        throw kernelError('ENOTTY', `feature ${flags & MASK} is not supported`, where);
    }
  }

  // --- typed helpers: each one VFIO_DEVICE_FEATURE call --------------------------------------

  /** VFIO_DEVICE_FEATURE_MIGRATION GET: the VFIO_MIGRATION_* flags. */
  getMigration(): { flags: bigint } {
    const data = { flags: 0n };
    this.deviceFeature({ flags: FeatureId.MIGRATION | GET, data });
    return data;
  }

  /** VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE GET. */
  getMigDeviceState(): MigState {
    const data: MigStateData = { deviceState: 0, dataFd: -1 };
    this.deviceFeature({ flags: FeatureId.MIG_DEVICE_STATE | GET, data });
    return data.deviceState as MigState;
  }

  /**
   * VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE SET: walks the path to `state`. Returns the new data
   * stream when the last arc opened a session, else -1. On failure throws; the device may be in
   * its original state, a state on the path, or ERROR: getMigDeviceState() tells.
   */
  setMigDeviceState(state: number): DataFdValue {
    const data: MigStateData = { deviceState: state, dataFd: -1 };
    this.deviceFeature({ flags: FeatureId.MIG_DEVICE_STATE | SET, data });
    return data.dataFd;
  }

  /** VFIO_DEVICE_FEATURE_MIG_DATA_SIZE GET: stop_copy_length. */
  getMigDataSize(): bigint {
    const data = { stopCopyLength: 0n };
    this.deviceFeature({ flags: FeatureId.MIG_DATA_SIZE | GET, data });
    return data.stopCopyLength;
  }

  /** VFIO_DEVICE_FEATURE_DMA_LOGGING_START; returns the page size the device chose. */
  dmaLoggingStart(control: {
    pageSize: bigint;
    ranges: readonly { iova: bigint; length: bigint }[];
  }): bigint {
    const data: DmaLoggingControl = { ...control, numRanges: control.ranges.length };
    this.deviceFeature({ flags: FeatureId.DMA_LOGGING_START | SET, data });
    return data.pageSize;
  }

  /** VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP. */
  dmaLoggingStop(): void {
    this.deviceFeature({ flags: FeatureId.DMA_LOGGING_STOP | SET });
  }

  /** VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT into a fresh zeroed bitmap (read-and-clear). */
  dmaLoggingReport(report: { iova: bigint; length: bigint; pageSize: bigint }): Uint8Array {
    // The bitmap is only sized once the kernel's own checks pass: a bad page_size or an overflowing
    // range must fail with its errno, not with an allocation of a nonsense size.
    let bitmap = new Uint8Array(0);
    if (loggingReportArgsValid(report)) {
      const bytes = reportBitmapBytes(report.length, report.pageSize);
      if (bytes > MAX_REPORT_BITMAP_BYTES) {
        throw new VfioError('ERR_BITMAP_TOO_LARGE', `a report bitmap of ${bytes} bytes is too large`, {
          target: this.name,
          op: 'DMA_LOGGING_REPORT',
        });
      }
      bitmap = new Uint8Array(Number(bytes));
    }
    this.deviceFeature({ flags: FeatureId.DMA_LOGGING_REPORT | GET, data: { ...report, bitmap } });
    return bitmap;
  }

  /** PROBE: does the feature offer these operations? (true = ioctl returned 0). */
  probeFeature(feature: number, ops: { get?: boolean; set?: boolean }): boolean {
    const flags = feature | PROBE | (ops.get ? GET : 0) | (ops.set ? SET : 0);
    try {
      this.deviceFeature({ flags });
      return true;
    } catch (err) {
      if (err instanceof VfioError && (err.errno === 'EINVAL' || err.errno === 'ENOTTY')) return false;
      throw err;
    }
  }

  /**
   * VFIO_DEVICE_RESET: kills open data fds, resets the device, state RUNNING. The only way out of
   * ERROR. A driver reset that throws leaves the device in ERROR (its sessions are already gone).
   */
  reset(): void {
    const op = 'VFIO_DEVICE_RESET';
    this.#checkOpen(op);
    const endFailure = this.#endSessions();
    try {
      this.driver.reset();
    } catch (err) {
      // The sessions are gone and the device is in no known state: only another reset helps.
      this.#state = MigState.ERROR;
      throw asKernelError(err, this.name, op);
    }
    this.#state = MigState.RUNNING;
    if (endFailure !== undefined) throw asKernelError(endFailure, this.name, op);
  }

  /** Close the device fd: sessions end, DMA logging stops, every later call fails EBADF. */
  close(): void {
    if (this.#closed) return;
    const endFailure = this.#endSessions();
    this.#stopLogging();
    this.#closed = true;
    if (endFailure !== undefined) throw asKernelError(endFailure, this.name, 'close');
  }

  // --- features ------------------------------------------------------------------------------

  #check(flags: number, payload: number, offered: number, structBytes: number, op: string): FeatureCheck {
    const where = { target: this.name, op };
    if ((flags & (GET | SET) & ~offered) !== 0) throw kernelError('EINVAL', 'operation not offered', where);
    if (flags & PROBE) return 'probe';
    if (!(flags & (GET | SET))) throw kernelError('EINVAL', 'neither GET nor SET', where);
    if (payload < structBytes) throw kernelError('EINVAL', `payload below ${structBytes} bytes`, where);
    return 'do';
  }

  #needMigration(op: string): void {
    if (!this.hasMigration)
      throw kernelError('ENOTTY', 'device has no migration support', { target: this.name, op });
  }

  #needLogging(op: string): void {
    if (!this.driver.dmaLogging)
      throw kernelError('ENOTTY', 'device has no DMA logging', { target: this.name, op });
  }

  /** copy_from_user/copy_to_user of the payload: no struct behind the pointer is EFAULT. */
  #needData(data: unknown, op: string): void {
    if (typeof data !== 'object' || data === null) {
      throw kernelError('EFAULT', 'no payload struct', { target: this.name, op });
    }
  }

  #featureMigration(flags: number, payload: number, data: unknown): void {
    const op = 'MIGRATION';
    this.#needMigration(op);
    if (this.#check(flags, payload, GET, FeaturePayloadBytes.MIGRATION, op) === 'probe') return;
    this.#needData(data, op);
    (data as { flags: bigint }).flags = BigInt(this.driver.migrationFlags);
  }

  #featureMigState(flags: number, payload: number, data: unknown): void {
    const op = 'MIG_DEVICE_STATE';
    this.#needMigration(op);
    if (this.#check(flags, payload, GET | SET, FeaturePayloadBytes.MIG_DEVICE_STATE, op) === 'probe') return;
    this.#needData(data, op);
    const mig = data as MigStateData;
    if (flags & GET) {
      mig.deviceState = this.#state;
      mig.dataFd = -1;
      return;
    }
    mig.dataFd = -1; // written back on failure and when no session opens
    const fd = this.#setState(mig.deviceState);
    if (fd) mig.dataFd = fd;
  }

  #featureDataSize(flags: number, payload: number, data: unknown): void {
    const op = 'MIG_DATA_SIZE';
    this.#needMigration(op);
    if (this.#check(flags, payload, GET, FeaturePayloadBytes.MIG_DATA_SIZE, op) === 'probe') return;
    this.#needData(data, op);
    // A query: a failing driver makes the ioctl fail, never the device change state.
    let length: bigint;
    try {
      length = this.driver.stopCopyLength();
    } catch (err) {
      throw asKernelError(err, this.name, op);
    }
    (data as { stopCopyLength: bigint }).stopCopyLength = length;
  }

  #featureLoggingStart(flags: number, payload: number, data: unknown): void {
    const op = 'DMA_LOGGING_START';
    this.#needLogging(op);
    if (this.#check(flags, payload, SET, FeaturePayloadBytes.DMA_LOGGING_CONTROL, op) === 'probe') return;
    this.#needData(data, op);
    const control = data as DmaLoggingControl;
    validateLoggingStart(control, { target: this.name, op });
    // Starting twice is a driver decision; pds and mlx5 refuse with EINVAL.
    if (this.#dirtyLog) throw kernelError('EINVAL', 'DMA logging already started', { target: this.name, op });
    const log = new DirtyPageLog(control.ranges.slice(0, control.numRanges), control.pageSize);
    this.#dirtyLog = log;
    this.#unobserve = this.dma!.observeWrites((iova, length) => log.markWritten(iova, length));
    control.pageSize = log.granuleBytes;
  }

  #featureLoggingStop(flags: number, payload: number): void {
    const op = 'DMA_LOGGING_STOP';
    this.#needLogging(op);
    if (this.#check(flags, payload, SET, 0, op) === 'probe') return;
    this.#stopLogging();
  }

  #featureLoggingReport(flags: number, payload: number, data: unknown): void {
    const op = 'DMA_LOGGING_REPORT';
    this.#needLogging(op);
    if (this.#check(flags, payload, GET, FeaturePayloadBytes.DMA_LOGGING_REPORT, op) === 'probe') return;
    this.#needData(data, op);
    const report = data as DmaLoggingReport;
    validateLoggingReport(report, { target: this.name, op });
    if (!this.#dirtyLog) throw kernelError('EINVAL', 'DMA logging is not started', { target: this.name, op });
    this.#dirtyLog.readAndClear(report.iova, report.length, report.pageSize, report.bitmap);
  }

  #stopLogging(): void {
    this.#unobserve?.();
    this.#unobserve = undefined;
    this.#dirtyLog = undefined;
  }

  // --- the state machine -----------------------------------------------------------------------

  /** mlx5vf_pci_set_device_state(): one arc per step until the target; a fd only from the last arc. */
  #setState(target: number): SavingStream | ResumeStream | undefined {
    const op = 'MIG_DEVICE_STATE SET';
    const where = { target: this.name, op };
    const features = this.driver.migrationFlags;
    if (!isMigState(target) || target === MigState.ERROR || !stateSupported(target, features)) {
      throw kernelError('EINVAL', `target state ${migStateName(target)} is not valid for this device`, where);
    }
    if (this.#state === MigState.ERROR) {
      throw kernelError('EINVAL', 'device is in ERROR; only VFIO_DEVICE_RESET leaves it', where);
    }
    let opened: SavingStream | ResumeStream | undefined;
    while (this.#state !== target) {
      const next = nextMigrationState(this.#state, target, features);
      if (opened) throw internalError(`${this.name}: a data fd was opened before the last arc`);
      opened = this.#arc(this.#state, next, op);
      this.#state = next;
      this.#saving?.stream.wake();
    }
    return opened;
  }

  /** Run one arc; on a driver failure the state stays `from`, or becomes ERROR if the driver says so. */
  #arc(from: MigState, to: MigState, op: string): SavingStream | ResumeStream | undefined {
    const S = MigState;
    const d = this.driver;
    let opened: SavingStream | ResumeStream | undefined;
    this.#driverCall(`${op} ${migStateName(from)}->${migStateName(to)}`, () => {
      switch (`${from}>${to}`) {
        case `${S.RUNNING}>${S.STOP}`:
        case `${S.RUNNING_P2P}>${S.STOP}`:
          d.stop();
          break;
        case `${S.STOP}>${S.RUNNING}`:
          d.start(false);
          break;
        case `${S.STOP}>${S.RUNNING_P2P}`:
          d.start(true);
          break;
        case `${S.RUNNING}>${S.RUNNING_P2P}`:
        case `${S.PRE_COPY}>${S.PRE_COPY_P2P}`:
          d.setP2pQuiesced(true);
          break;
        case `${S.RUNNING_P2P}>${S.RUNNING}`:
        case `${S.PRE_COPY_P2P}>${S.PRE_COPY}`:
          d.setP2pQuiesced(false);
          break;
        case `${S.RUNNING}>${S.PRE_COPY}`:
        case `${S.RUNNING_P2P}>${S.PRE_COPY_P2P}`:
          opened = this.#openSaving(true);
          break;
        case `${S.STOP}>${S.STOP_COPY}`:
          opened = this.#openSaving(false);
          break;
        case `${S.PRE_COPY}>${S.STOP_COPY}`:
        case `${S.PRE_COPY_P2P}>${S.STOP_COPY}`:
          this.#saving!.session.enterStopCopy();
          break;
        case `${S.PRE_COPY}>${S.RUNNING}`:
        case `${S.PRE_COPY_P2P}>${S.RUNNING_P2P}`:
        case `${S.STOP_COPY}>${S.STOP}`: {
          // end() first: if it fails the arc did not happen and the session is still there.
          const saving = this.#saving!;
          saving.session.end();
          this.#saving = undefined;
          saving.stream.kill();
          break;
        }
        case `${S.STOP}>${S.RESUMING}`:
          opened = this.#openResuming();
          break;
        case `${S.RESUMING}>${S.STOP}`: {
          const resuming = this.#resuming!;
          resuming.session.finish();
          resuming.session.end();
          this.#resuming = undefined;
          resuming.stream.kill();
          break;
        }
        default:
          throw internalError(`${this.name}: no arc ${migStateName(from)} -> ${migStateName(to)}`);
      }
    });
    return opened;
  }

  #openSaving(precopy: boolean): SavingStream {
    const holder: { stream?: SavingStream } = {};
    const session = this.driver.startSaving({ precopy, dataReady: () => holder.stream?.wake() });
    const stream = new SavingStream(this, session);
    holder.stream = stream;
    this.#saving = { session, stream };
    return stream;
  }

  #openResuming(): ResumeStream {
    const session = this.driver.startResuming();
    const stream = new ResumeStream(this, session);
    this.#resuming = { session, stream };
    return stream;
  }

  /**
   * Tear down every open session (ERROR, reset, close): the fds die whatever the driver does. Every
   * session gets end(); the first failure is returned for the caller to report after its own work.
   */
  #endSessions(): unknown {
    const sessions = [this.#saving, this.#resuming];
    this.#saving = undefined;
    this.#resuming = undefined;
    let failure: unknown;
    for (const s of sessions) {
      if (!s) continue;
      s.stream.kill();
      try {
        s.session.end();
      } catch (err) {
        failure ??= err;
      }
    }
    return failure;
  }

  /**
   * Run one arc in the driver. VfioErrors pass through (as kernel errors of this device);
   * ArcBrokeDevice and anything that is not a VfioError (a driver bug) put the device in ERROR,
   * which ends every session.
   */
  #driverCall<T>(op: string, fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      if (err instanceof ArcBrokeDevice || !(err instanceof VfioError)) {
        this.#state = MigState.ERROR;
        this.#endSessions(); // a failing end() here must not hide the arc's own error
      }
      throw asKernelError(err, this.name, op);
    }
  }

  #checkOpen(op: string): void {
    if (this.#closed) throw kernelError('EBADF', 'device fd is closed', { target: this.name, op });
  }
}

/** Largest bitmap dmaLoggingReport() allocates for its caller (1 GiB of bitmap = 32 TiB at 4 KiB). */
const MAX_REPORT_BITMAP_BYTES = 1n << 30n;

function defaultPayloadBytes(feature: number): number {
  switch (feature) {
    case FeatureId.MIGRATION:
      return FeaturePayloadBytes.MIGRATION;
    case FeatureId.MIG_DEVICE_STATE:
      return FeaturePayloadBytes.MIG_DEVICE_STATE;
    case FeatureId.MIG_DATA_SIZE:
      return FeaturePayloadBytes.MIG_DATA_SIZE;
    case FeatureId.DMA_LOGGING_START:
      return FeaturePayloadBytes.DMA_LOGGING_CONTROL;
    case FeatureId.DMA_LOGGING_REPORT:
      return FeaturePayloadBytes.DMA_LOGGING_REPORT;
    default:
      return 0;
  }
}

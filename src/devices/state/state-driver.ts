import { DmaPort, dmaFaultOf, UnattachedDmaSpace } from '../../kernel/vfio/dma-port.js';
import type { MigrationDriver, ResumingSession, SavingSession } from '../../kernel/vfio/migration-driver.js';
import { VfioDevice } from '../../kernel/vfio/vfio-device.js';
import { internalError } from '../../uapi/error.js';
import type { MigFeatureFlags } from '../../uapi/migration.js';
import type { SampleDevice } from '../sample-device.js';
import { StateLoader } from './state-loader.js';
import type { DeviceStateImage, StateRegion } from './state-region.js';
import { recordHeadersFor, StateSaver } from './state-saver.js';
import { RECORD_HEADER_BYTES, STREAM_HEADER_BYTES } from './stream-format.js';

/**
 * A migration driver whose whole state is a DeviceStateImage: run state bookkeeping, saving and
 * resuming sessions over the shared stream codec, MIG_DATA_SIZE. A device adds its work and its
 * power-on state.
 */
export class StateDriver implements MigrationDriver {
  readonly deviceType: string;
  readonly migrationFlags: MigFeatureFlags;
  readonly dmaLogging: boolean;
  readonly image: DeviceStateImage;
  readonly #powerOn: (fresh: boolean) => void;
  #running = true;
  #quiesced = false;
  #saver: StateSaver | undefined;
  #loader: StateLoader | undefined;

  /**
   * `powerOn(fresh)` writes the power-on state; `fresh` = regions are still all zero (construction).
   * `dmaLogging`: the device tracks its own DMA writes (the VFIO DMA_LOGGING_* features).
   */
  constructor(
    image: DeviceStateImage,
    migrationFlags: MigFeatureFlags,
    powerOn: (fresh: boolean) => void,
    options: { dmaLogging?: boolean } = {},
  ) {
    this.deviceType = image.deviceType;
    this.migrationFlags = migrationFlags;
    this.dmaLogging = options.dmaLogging ?? false;
    this.image = image;
    this.#powerOn = powerOn;
    powerOn(true);
  }

  /** The device executes (its work changes state). */
  get running(): boolean {
    return this.#running;
  }

  /** P2P-quiesced: running but no DMA. */
  get quiesced(): boolean {
    return this.#quiesced;
  }

  stop(): void {
    this.#running = false;
    this.#quiesced = false;
  }

  start(p2pQuiesced: boolean): void {
    this.#running = true;
    this.#quiesced = p2pQuiesced;
  }

  setP2pQuiesced(quiesced: boolean): void {
    this.#quiesced = quiesced;
  }

  startSaving(options: { precopy: boolean; dataReady: () => void }): SavingSession {
    if (this.#saver) throw internalError(`${this.deviceType}: a saving session is already open`);
    const saver = new StateSaver(this.image, { ...options, stopDevice: () => this.stop() });
    this.#saver = saver;
    const end = saver.end.bind(saver);
    saver.end = () => {
      end();
      if (this.#saver === saver) this.#saver = undefined;
    };
    return saver;
  }

  startResuming(): ResumingSession {
    const loader = new StateLoader(this.image);
    this.#loader = loader;
    const end = loader.end.bind(loader);
    loader.end = () => {
      end();
      if (this.#loader === loader) this.#loader = undefined;
    };
    return loader;
  }

  stopCopyLength(): bigint {
    if (this.#saver) return this.#saver.remainingBytes();
    const total = Number(this.image.identity.totalRegionBytes);
    return BigInt(STREAM_HEADER_BYTES + total + recordHeadersFor(total) + RECORD_HEADER_BYTES);
  }

  reset(): void {
    this.#saver?.end();
    this.#loader?.end();
    this.#running = true;
    this.#quiesced = false;
    this.#powerOn(false);
  }
}

/**
 * A SampleDevice over a StateDriver: `step` is one unit of the device's own work, given the DMA
 * port unless the device is P2P-quiesced. A device with DMA logging always has a port (the VFIO core
 * watches it): given none, it gets one over an UnattachedDmaSpace, where every DMA faults.
 */
export class StateSampleDevice implements SampleDevice {
  readonly vfio: VfioDevice;
  readonly driver: StateDriver;
  readonly #step: (dma: DmaPort | undefined) => void;

  constructor(
    name: string,
    driver: StateDriver,
    dma: DmaPort | undefined,
    step: (dma: DmaPort | undefined) => void,
  ) {
    this.driver = driver;
    const port = dma ?? (driver.dmaLogging ? new DmaPort(new UnattachedDmaSpace()) : undefined);
    this.vfio = port ? new VfioDevice({ name, driver, dma: port }) : new VfioDevice({ name, driver });
    this.#step = step;
  }

  work(units = 1): void {
    for (let i = 0; i < units && this.driver.running; i++)
      this.#step(this.driver.quiesced ? undefined : this.vfio.dma);
  }

  digest(): string {
    return this.driver.image.digest();
  }
}

/** xorshift32: the device's seeded PRNG step (its state lives in device registers). */
export function xorshift32(x: number): number {
  let s = x >>> 0 || 0x9e3779b9;
  s ^= s << 13;
  s >>>= 0;
  s ^= s >>> 17;
  s ^= s << 5;
  return s >>> 0;
}

/**
 * Where a device keeps its DMA fault report in its registers: a u64 count and the u64 IOVA of the
 * last fault (migratable state like every other register).
 */
export interface DmaFaultRegisters {
  count: number;
  lastIova: number;
}

/** Runs one DMA of the device; a DmaFault is recorded in its registers: false. Other errors throw. */
export function deviceDma(regs: StateRegion, at: DmaFaultRegisters, dma: () => void): boolean {
  const fault = dmaFaultOf(dma);
  if (!fault) return true;
  regs.setU64(at.count, regs.u64(at.count) + 1n);
  regs.setU64(at.lastIova, fault.iova);
  return false;
}

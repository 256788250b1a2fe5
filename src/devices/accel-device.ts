import { SEGMENT_BYTES } from '../kernel/mem/phys-memory.js';
import { invalidArgument } from '../uapi/error.js';
import { MigFeature } from '../uapi/migration.js';
import type { SampleDevice, SampleDeviceFactory, SampleDeviceOptions } from './sample-device.js';
import {
  deviceDma,
  StateDriver as Driver,
  type StateDriver,
  StateSampleDevice,
  xorshift32,
} from './state/state-driver.js';
import { DeviceStateImage } from './state/state-region.js';

export interface AccelDeviceOptions extends SampleDeviceOptions {
  /** Device memory size (default 64 MiB; several GiB work). A multiple of 4 KiB. */
  memoryBytes?: number;
  /** Guest buffer jobs read their input from and write completions to, when a DMA port is given. */
  guestBuffer?: { iova: bigint; bytes: number };
}

const PAGE = 4096;
/** Execution context registers. */
export const ACCEL_CTX = {
  PRNG: 0,
  SUBMITTED: 8,
  COMPLETED: 16,
  LAST_OFFSET: 24,
  LAST_LENGTH: 32,
  DMA_BYTES: 40,
  /** DMA faults jobs met (the IOMMU refused an input read or a completion write), last IOVA. */
  DMA_FAULTS: 48,
  LAST_FAULT_IOVA: 56,
} as const;
const CTX = ACCEL_CTX;
const DMA_INPUT_BYTES = 4096;
const COMPLETION_BYTES = 64;

/**
 * An accelerator: device memory that jobs rewrite (a few KiB to 256 KiB at random offsets), an
 * execution context (registers, job counters) sent at stop-copy. PRE_COPY streams device memory
 * while jobs run and re-sends the chunks they dirty.
 *
 * With a guest buffer, a job reads its input from it and writes a completion back. A DMA the IOMMU
 * refuses ends the job's DMA there: an input fault skips the input and the completion, a
 * completion fault writes nothing; DMA_FAULTS counts them, LAST_FAULT_IOVA keeps the last IOVA,
 * DMA_BYTES only counts transfers that happened. work() never throws for a DMA fault.
 */
export function createAccelDevice(options: AccelDeviceOptions = {}): SampleDevice & { driver: StateDriver } {
  const memoryBytes = options.memoryBytes ?? 64 << 20;
  if (!Number.isSafeInteger(memoryBytes) || memoryBytes < PAGE || memoryBytes % PAGE !== 0) {
    throw invalidArgument(`accel: memoryBytes ${memoryBytes} must be a positive multiple of 4 KiB`);
  }
  const image = new DeviceStateImage('accel', 1, [
    { name: 'memory', sizeBytes: memoryBytes, precopy: true },
    { name: 'context', sizeBytes: 4096, precopy: false },
  ]);
  const mem = image.region('memory');
  const ctx = image.region('context');
  const seed = options.seed ?? 1;
  const driver = new Driver(
    image,
    options.migrationFlags ?? MigFeature.STOP_COPY | MigFeature.PRE_COPY,
    (fresh) => {
      if (!fresh) {
        mem.clear();
        ctx.clear();
      }
      ctx.setU32(CTX.PRNG, seed >>> 0 || 1);
    },
  );
  const pages = memoryBytes / PAGE;
  const input = new Uint8Array(DMA_INPUT_BYTES);
  const completion = new Uint8Array(COMPLETION_BYTES);
  const completionWords = new DataView(completion.buffer);
  const guest = options.guestBuffer;
  const faultRegs = { count: CTX.DMA_FAULTS, lastIova: CTX.LAST_FAULT_IOVA };

  return new StateSampleDevice(options.name ?? 'accel0', driver, options.dma, (dma) => {
    let x = xorshift32(ctx.u32(CTX.PRNG));
    const offset = (x % pages) * PAGE;
    x = xorshift32(x);
    let length = PAGE * (1 + (x % 64));
    length = Math.min(length, memoryBytes - offset, SEGMENT_BYTES - (offset % SEGMENT_BYTES));
    const job = ctx.u64(CTX.SUBMITTED);
    ctx.setU64(CTX.SUBMITTED, job + 1n);
    const target = mem.mutate(offset, length);
    const words = new Uint32Array(target.buffer, target.byteOffset, length >>> 2);
    for (let i = 0; i < words.length; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      words[i] = x;
    }
    x >>>= 0;
    if (dma && guest && guest.bytes >= DMA_INPUT_BYTES + COMPLETION_BYTES) {
      // Input from the guest buffer lands at the start of the job's range; a completion goes back.
      const slots = Math.floor((guest.bytes - COMPLETION_BYTES) / PAGE);
      const inputIova = guest.iova + BigInt((x % Math.max(1, slots)) * PAGE);
      if (deviceDma(ctx, faultRegs, () => dma.read(inputIova, input))) {
        ctx.setU64(CTX.DMA_BYTES, ctx.u64(CTX.DMA_BYTES) + BigInt(DMA_INPUT_BYTES));
        target.set(input.subarray(0, Math.min(input.length, length)));
        completionWords.setBigUint64(0, job, true);
        completionWords.setBigUint64(8, BigInt(offset), true);
        completionWords.setUint32(16, length, true);
        completionWords.setUint32(20, x, true);
        const completionIova = guest.iova + BigInt(guest.bytes - COMPLETION_BYTES);
        if (deviceDma(ctx, faultRegs, () => dma.write(completionIova, completion))) {
          ctx.setU64(CTX.DMA_BYTES, ctx.u64(CTX.DMA_BYTES) + BigInt(COMPLETION_BYTES));
        }
      }
    }
    ctx.setU64(CTX.LAST_OFFSET, BigInt(offset));
    ctx.setU64(CTX.LAST_LENGTH, BigInt(length));
    ctx.setU64(CTX.COMPLETED, job + 1n);
    ctx.setU32(CTX.PRNG, x);
  });
}

export const accelDeviceFactory: SampleDeviceFactory<AccelDeviceOptions> = {
  type: 'accel',
  description: 'accelerator with device memory changed by jobs (STOP_COPY|PRE_COPY, P2P optional)',
  create: createAccelDevice,
};

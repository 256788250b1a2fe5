import { randomFillSync } from 'node:crypto';
import { createAccelDevice } from '../src/devices/accel-device.js';
import { checksumWorkerStats } from '../src/kernel/mem/checksum-worker.js';
import type { ResumeStream, SavingStream } from '../src/kernel/vfio/mig-data-stream.js';
import { MigState } from '../src/uapi/migration.js';

const PIECE = 1 << 20;

export interface DeviceSaveLoadFigures {
  memoryBytes: number;
  /** (a) readInto(1 MiB buffer) -> write, through the VfioDevice data fds. */
  readWriteGBps: number;
  /** (b) writeFrom(target => saving.readInto(target)): one copy, device memory to device memory. */
  writeFromGBps: number;
  /** (c) Buffer copy of the same bytes in 1 MiB pieces. */
  pieceCopyGBps: number;
  /** (d) One Buffer.copy of the whole memory. */
  wholeCopyGBps: number;
  /** Share of the record checksums of the (b) runs computed on the checksum worker thread. */
  writeFromChecksumsOnWorker: number;
  writeFromVsPieceCopy: number;
  readWriteVsPieceCopy: number;
  writeFromVsWholeCopy: number;
}

function gbps(bytes: number, ms: number): number {
  return bytes / 1e9 / (ms / 1e3);
}

/** Save + load of an accel device with `memoryBytes` of random device memory, against plain copies. */
export async function benchDeviceSaveLoad(memoryBytes = 1 << 30): Promise<DeviceSaveLoadFigures> {
  const source = createAccelDevice({ memoryBytes, seed: 1 });
  const memory = source.driver.image.region('memory');
  for (let at = 0; at < memoryBytes; at += 1 << 30) {
    const n = Math.min(1 << 30, memoryBytes - at);
    for (let p = 0; p < n; p += 64 << 20)
      randomFillSync(memory.memory.view(at + p, Math.min(64 << 20, n - p)));
  }
  source.vfio.setMigDeviceState(MigState.STOP);

  const run = (splice: boolean): number => {
    const dest = createAccelDevice({ memoryBytes, seed: 2 });
    // touch the destination once so every variant pays the same (no first-touch page faults)
    dest.driver.image.region('memory').memory.fill(1);
    const saving = source.vfio.setMigDeviceState(MigState.STOP_COPY) as SavingStream;
    dest.vfio.setMigDeviceState(MigState.STOP);
    const resume = dest.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
    const t0 = performance.now();
    if (splice) {
      while (resume.writeFrom((target) => saving.readInto(target)) > 0);
    } else {
      const buf = new Uint8Array(PIECE);
      for (let n = saving.readInto(buf); n > 0; n = saving.readInto(buf)) resume.write(buf.subarray(0, n));
    }
    dest.vfio.setMigDeviceState(MigState.STOP);
    const ms = performance.now() - t0;
    source.vfio.setMigDeviceState(MigState.STOP);
    if (dest.digest() !== source.digest()) throw new Error('bench: loaded state differs');
    return ms;
  };

  const src = Buffer.from(memory.memory.buffers[0]!, 0, Math.min(memoryBytes, 1 << 30));
  const dst = Buffer.alloc(src.length, 1);
  const pieceCopy = (): number => {
    const t0 = performance.now();
    for (let at = 0; at < src.length; at += PIECE) src.copy(dst, at, at, Math.min(at + PIECE, src.length));
    return performance.now() - t0;
  };
  const wholeCopy = (): number => {
    const t0 = performance.now();
    src.copy(dst);
    return performance.now() - t0;
  };

  // warm up once each, then take the best of 3
  const best = (f: () => number, runs = 3): number => Math.min(...Array.from({ length: runs }, f));
  run(false);
  run(true);
  pieceCopy();
  const a = best(() => run(false));
  const before = checksumWorkerStats();
  const b = best(() => run(true));
  const after = checksumWorkerStats();
  const c = best(pieceCopy) * (memoryBytes / src.length);
  const d = best(wholeCopy) * (memoryBytes / src.length);
  const figures = {
    memoryBytes,
    readWriteGBps: gbps(memoryBytes, a),
    writeFromGBps: gbps(memoryBytes, b),
    pieceCopyGBps: gbps(memoryBytes, c),
    wholeCopyGBps: gbps(memoryBytes, d),
  };
  return {
    ...figures,
    writeFromChecksumsOnWorker:
      (after.fromWorker - before.fromWorker) / Math.max(1, after.submitted - before.submitted),
    writeFromVsPieceCopy: figures.writeFromGBps / figures.pieceCopyGBps,
    readWriteVsPieceCopy: figures.readWriteGBps / figures.pieceCopyGBps,
    writeFromVsWholeCopy: figures.writeFromGBps / figures.wholeCopyGBps,
  };
}

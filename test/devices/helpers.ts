import assert from 'node:assert/strict';
import type { SampleDevice } from '../../src/devices/sample-device.js';
import type { StateDriver } from '../../src/devices/state/state-driver.js';
import type { ResumeStream, SavingStream } from '../../src/kernel/vfio/mig-data-stream.js';
import { VfioError } from '../../src/uapi/error.js';
import { MigState } from '../../src/uapi/migration.js';
import { concatBytes as concat } from '../../src/devices/conformance/data-fds.js';

export { concat };

export type Dev = SampleDevice & { driver: StateDriver };

/** Read everything a saving stream has now (stop-copy: to the end), in pieces of `chunk` bytes. */
export function drain(stream: SavingStream, chunk: number | (() => number), out: Uint8Array[]): number {
  let total = 0;
  for (;;) {
    const size = typeof chunk === 'number' ? chunk : chunk();
    const buf = new Uint8Array(size);
    let n: number;
    try {
      n = stream.readInto(buf);
    } catch (err) {
      if (err instanceof VfioError && err.errno === 'ENOMSG') return total;
      throw err;
    }
    if (n === 0) return total;
    out.push(buf.subarray(0, n));
    total += n;
  }
}

/** Source: RUNNING -> PRE_COPY (when offered; work between reads) -> STOP_COPY -> read to end -> STOP. */
export function saveStream(source: Dev, options: { chunk?: number; workUnits?: number } = {}): Uint8Array {
  const chunk = options.chunk ?? 64 * 1024;
  const parts: Uint8Array[] = [];
  const precopy = (source.driver.migrationFlags & 4) !== 0;
  if (precopy) {
    const stream = source.vfio.setMigDeviceState(MigState.PRE_COPY) as SavingStream;
    for (let round = 0; round < 3; round++) {
      drain(stream, chunk, parts);
      source.work(options.workUnits ?? 5);
    }
    source.vfio.setMigDeviceState(MigState.STOP_COPY);
    drain(stream, chunk, parts);
  } else {
    source.work(options.workUnits ?? 5);
    const stream = source.vfio.setMigDeviceState(MigState.STOP_COPY) as SavingStream;
    drain(stream, chunk, parts);
  }
  source.vfio.setMigDeviceState(MigState.STOP);
  return concat(parts);
}

/** Destination: STOP -> RESUMING, write in pieces, -> STOP (throws on a bad stream). */
export function loadStream(dest: Dev, bytes: Uint8Array, chunk = 100_000): ResumeStream {
  dest.vfio.setMigDeviceState(MigState.STOP);
  const stream = dest.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
  for (let at = 0; at < bytes.length; at += chunk) stream.write(bytes.subarray(at, at + chunk));
  dest.vfio.setMigDeviceState(MigState.STOP);
  return stream;
}

/** A load that must fail RESUMING->STOP with `errno`, leaving the device in RESUMING. */
export function assertLoadFails(dest: Dev, bytes: Uint8Array, errno: string): void {
  dest.vfio.setMigDeviceState(MigState.STOP);
  const stream = dest.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
  try {
    stream.write(bytes);
  } catch (err) {
    assert.ok(err instanceof VfioError, String(err));
    assert.equal(err.errno, errno, err.message);
  }
  assert.throws(
    () => dest.vfio.setMigDeviceState(MigState.STOP),
    (err: unknown) => {
      assert.ok(err instanceof VfioError);
      assert.equal(err.errno, errno, err.message);
      return true;
    },
  );
  assert.notEqual(dest.vfio.getMigDeviceState(), MigState.STOP);
  dest.vfio.reset();
}

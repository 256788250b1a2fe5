import assert from 'node:assert/strict';
import { test } from 'node:test';
import { accelDeviceFactory, MigState, type ResumeStream, type SavingStream } from '../src/index.js';

// The README's data-stream example, through the package root, as written there.
test('README example: precopy + stop-copy of an accel through the package root gives equal digests', () => {
  const src = accelDeviceFactory.create({ name: 'accel0', memoryBytes: 16 << 20 });
  const dst = accelDeviceFactory.create({ name: 'accel1', memoryBytes: 16 << 20 });
  src.work(100);
  const saving = src.vfio.setMigDeviceState(MigState.PRE_COPY) as SavingStream;
  dst.vfio.setMigDeviceState(MigState.STOP);
  const resume = dst.vfio.setMigDeviceState(MigState.RESUMING) as ResumeStream;
  for (const chunk of saving.chunks()) resume.write(chunk);
  src.vfio.setMigDeviceState(MigState.STOP_COPY);
  for (const chunk of saving.chunks()) resume.write(chunk);
  dst.vfio.setMigDeviceState(MigState.RUNNING);
  assert.equal(dst.vfio.getMigDeviceState(), MigState.RUNNING);
  assert.equal(dst.digest(), src.digest());
  assert.notEqual(dst.digest(), accelDeviceFactory.create({ memoryBytes: 16 << 20 }).digest());
});

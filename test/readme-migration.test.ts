import assert from 'node:assert/strict';
import { after, test } from 'node:test';
import { Host, IncomingMigration, Machine, type MachineDefinition, OutgoingMigration } from '../src/index.js';

const MiB = 2 ** 20;
const definition: MachineDefinition = {
  name: 'vm-readme',
  iommu: 'iommufd',
  ram: [{ name: 'pc.ram', sizeBytes: 32 * MiB }],
  vcpus: { count: 1, workload: { dirtyRateMiBps: 8, seed: 1 } },
  devices: [
    { type: 'nic', name: 'nic0', flowTableBytes: MiB, rxRing: { entries: 32, bufferBytes: 2048 } },
    { type: 'accel', name: 'accel0', memoryBytes: 4 * MiB, guestBufferBytes: 64 * 1024 },
    { type: 'basic', name: 'basic0' },
  ],
  guestDriverIntervalMs: 5,
};
const srcVm = Machine.create(new Host(), definition);
const dstVm = Machine.create(new Host(), definition);
after(() => Promise.all([srcVm.destroy(), dstVm.destroy()]));

// The README's live migration example, through the package root, as written there.
test('README example: a VM migrates between two hosts; digests equal before the destination runs', async () => {
  await srcVm.start();
  const iterations: number[] = [];
  const incoming = await IncomingMigration.listen(dstVm, { autostart: false });
  const migration = OutgoingMigration.start(srcVm, {
    uri: `tcp:127.0.0.1:${incoming.address.port}`,
    params: { downtimeLimitMs: 300, multifdChannels: 4 },
  });
  migration.onEvent((e) => e.type === 'pass' && iterations.push(e.iteration));
  const info = await migration.done;
  assert.equal(info.status, 'completed', info.error?.message);
  assert.equal((await incoming.done).status, 'completed');
  assert.ok(iterations.length >= 1 && iterations[0] === 1);
  assert.equal(info.channels.length, 5);
  assert.equal(srcVm.state, 'migrated');
  assert.equal(dstVm.state, 'stopped');
  assert.equal(dstVm.digest(), srcVm.digest());
  await dstVm.start();
  assert.equal(dstVm.state, 'running');
});

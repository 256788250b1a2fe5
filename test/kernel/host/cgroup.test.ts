import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Cgroup, Host } from '../../../src/kernel/host/index.js';
import { Errno, type ErrnoName } from '../../../src/uapi/errno.js';
import { isErrno } from '../../../src/uapi/error.js';

const MiB = 1024n * 1024n;
const PAGES_PER_MIB = 256;

function throwsErrno(fn: () => unknown, errno: ErrnoName): void {
  assert.throws(fn, (e: unknown) => {
    if (!isErrno(e, errno)) throw e;
    return true;
  });
}

/** /machine (limit `machine`), /machine/vm1 and /machine/vm2 (limit `vm` each). */
function tree(opts: { machine?: bigint; vm?: bigint } = {}) {
  const host = new Host();
  const machine = host.rootCgroup.mkdir('machine', { pinnedLimitBytes: opts.machine });
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: opts.vm });
  const vm2 = machine.mkdir('vm2', { pinnedLimitBytes: opts.vm });
  return { host, root: host.rootCgroup, machine, vm1, vm2 };
}

test('cgroup tree: paths, lookup by path (EINVAL relative, ENOENT missing), mkdir EEXIST/EINVAL', () => {
  const { host, root, machine, vm1 } = tree();
  assert.equal(root.path, '/');
  assert.equal(root.parent, undefined);
  assert.equal(vm1.path, '/machine/vm1');
  assert.equal(vm1.parent, machine);
  assert.equal(host.cgroup('/'), root);
  assert.equal(host.cgroup('/machine/vm1'), vm1);
  assert.equal(host.cgroup('/machine/vm1/'), vm1);
  assert.equal(machine.child('vm1'), vm1);
  assert.deepEqual(
    [...machine.children].map((c) => c.name),
    ['vm1', 'vm2'],
  );
  throwsErrno(() => host.cgroup('machine/vm1'), 'EINVAL');
  throwsErrno(() => host.cgroup('/machine/vm3'), 'ENOENT');
  throwsErrno(() => machine.mkdir('vm1'), 'EEXIST');
  for (const bad of ['', '.', '..', 'a/b']) throwsErrno(() => machine.mkdir(bad), 'EINVAL');
  assert.equal(vm1.pinnedLimitBytes, undefined, 'no limit by default');
});

test('pinned.max: EINVAL for a negative or over-u64 value; pages rounded down; may be set below usage', () => {
  const { machine, vm1 } = tree();
  throwsErrno(() => machine.mkdir('bad', { pinnedLimitBytes: -1n }), 'EINVAL');
  assert.equal(machine.child('bad'), undefined, 'nothing created');
  throwsErrno(() => (vm1.pinnedLimitBytes = -4096n), 'EINVAL');
  throwsErrno(() => (vm1.pinnedLimitBytes = 1n << 64n), 'EINVAL');
  assert.equal(vm1.pinnedLimitBytes, undefined, 'unchanged');
  vm1.pinnedLimitBytes = 3n * 4096n + 4095n; // 3 pages
  vm1.chargePinned(3);
  throwsErrno(() => vm1.chargePinned(1), 'ENOMEM');
  vm1.pinnedLimitBytes = 4096n; // below the usage: nothing taken back
  assert.equal(vm1.pinnedPages, 3);
  vm1.unchargePinned(2);
  throwsErrno(() => vm1.chargePinned(1), 'ENOMEM');
  vm1.pinnedLimitBytes = undefined;
  vm1.chargePinned(1000);
  assert.equal(vm1.pinnedBytes, 1001n * 4096n);
});

test('charges go up the hierarchy; a charge over any ancestor limit is ENOMEM with nothing changed', () => {
  const { root, machine, vm1, vm2 } = tree({ machine: 6n * MiB, vm: 4n * MiB });
  vm1.chargePinned(4 * PAGES_PER_MIB);
  assert.equal(vm1.pinnedBytes, 4n * MiB);
  assert.equal(machine.pinnedBytes, 4n * MiB);
  assert.equal(root.pinnedBytes, 4n * MiB, 'the root counts everything');
  throwsErrno(() => vm1.chargePinned(1), 'ENOMEM');
  assert.equal(vm1.pinnedMaxEvents, 1, 'vm1 refused it');
  // vm2 is well under its own limit, /machine is not.
  throwsErrno(() => vm2.chargePinned(4 * PAGES_PER_MIB), 'ENOMEM');
  assert.equal(vm2.pinnedMaxEvents, 0);
  assert.equal(machine.pinnedMaxEvents, 1, '/machine refused it');
  assert.equal(vm2.pinnedPages, 0);
  assert.equal(machine.pinnedBytes, 4n * MiB);
  vm2.chargePinned(2 * PAGES_PER_MIB); // exactly at /machine's limit
  assert.equal(machine.pinnedBytes, 6n * MiB);
  vm1.unchargePinned(4 * PAGES_PER_MIB);
  assert.equal(machine.pinnedBytes, 2n * MiB);
  assert.equal(root.pinnedBytes, 2n * MiB);
  assert.throws(() => vm1.unchargePinned(1), /uncharge/, 'an uncharge below zero is a bug');
});

test('movePinned: only the levels below the common ancestor change; ENOMEM on the new side changes nothing', () => {
  const { machine, vm1, vm2, root } = tree({ machine: 6n * MiB, vm: 4n * MiB });
  const other = root.mkdir('other', { pinnedLimitBytes: 1n * MiB });
  vm1.chargePinned(4 * PAGES_PER_MIB);
  // /machine is at 4 of 6 MiB: charging vm2 first would be 8; a move keeps /machine at 4.
  Cgroup.movePinned(vm1, vm2, 4 * PAGES_PER_MIB);
  assert.equal(vm1.pinnedPages, 0);
  assert.equal(vm2.pinnedBytes, 4n * MiB);
  assert.equal(machine.pinnedBytes, 4n * MiB);
  throwsErrno(() => Cgroup.movePinned(vm2, other, 4 * PAGES_PER_MIB), 'ENOMEM');
  assert.equal(vm2.pinnedBytes, 4n * MiB);
  assert.equal(other.pinnedPages, 0);
  assert.equal(machine.pinnedBytes, 4n * MiB);
  Cgroup.movePinned(vm2, other, 4 * PAGES_PER_MIB, true); // forced (an undo): no check
  assert.equal(other.pinnedBytes, 4n * MiB);
  assert.equal(machine.pinnedPages, 0);
  assert.equal(root.pinnedBytes, 4n * MiB);
  // To an ancestor and back down.
  Cgroup.movePinned(other, root, 4 * PAGES_PER_MIB);
  assert.equal(other.pinnedPages, 0);
  assert.equal(root.pinnedBytes, 4n * MiB);
  Cgroup.movePinned(root, vm1, 4 * PAGES_PER_MIB);
  assert.equal(vm1.pinnedBytes, 4n * MiB);
  assert.equal(machine.pinnedBytes, 4n * MiB);
  assert.equal(root.pinnedBytes, 4n * MiB);
});

test('membership: spawn({cgroup}) by object or path, fork inherits, exec keeps, exit leaves', () => {
  const { host, root, vm1, vm2 } = tree();
  const plain = host.spawn();
  assert.equal(plain.cgroup, root);
  const a = host.spawn({ cgroup: vm1 });
  const b = host.spawn({ cgroup: '/machine/vm2' });
  assert.equal(a.cgroup, vm1);
  assert.equal(b.cgroup, vm2);
  const child = a.fork();
  assert.equal(child.cgroup, vm1);
  child.exec();
  assert.equal(child.cgroup, vm1);
  assert.deepEqual(
    vm1.processes.map((p) => p.pid),
    [a.pid, child.pid],
  );
  child.exit();
  assert.deepEqual(
    vm1.processes.map((p) => p.pid),
    [a.pid],
  );
  assert.equal(child.cgroup, vm1, 'an exited process remembers its last cgroup');
  vm2.attach(a);
  assert.equal(a.cgroup, vm2);
  assert.deepEqual(vm1.processes, []);
});

test('spawn and attach errors: ENOENT (missing or removed), EINVAL (another host), ESRCH (exited)', () => {
  const { host, machine, vm1 } = tree();
  const before = [...host.processes].length;
  throwsErrno(() => host.spawn({ cgroup: '/machine/nope' }), 'ENOENT');
  throwsErrno(() => host.spawn({ cgroup: 'machine' }), 'EINVAL');
  const elsewhere = new Host().rootCgroup.mkdir('x');
  throwsErrno(() => host.spawn({ cgroup: elsewhere }), 'EINVAL');
  const gone = machine.mkdir('gone');
  gone.rmdir();
  throwsErrno(() => host.spawn({ cgroup: gone }), 'ENOENT');
  assert.equal([...host.processes].length, before, 'no process was created');
  const p = host.spawn();
  throwsErrno(() => gone.attach(p), 'ENOENT');
  throwsErrno(() => elsewhere.attach(p), 'EINVAL');
  p.exit();
  throwsErrno(() => vm1.attach(p), 'ESRCH');
  assert.equal(Errno.ESRCH, 3);
});

test('rmdir: EBUSY for the root, with processes or children; charges stay with a removed cgroup', () => {
  const { host, root, machine, vm1 } = tree({ machine: 2n * MiB });
  throwsErrno(() => root.rmdir(), 'EBUSY');
  throwsErrno(() => machine.rmdir(), 'EBUSY');
  const p = host.spawn({ cgroup: vm1 });
  throwsErrno(() => vm1.rmdir(), 'EBUSY');
  vm1.chargePinned(PAGES_PER_MIB);
  p.exit();
  vm1.rmdir();
  assert.ok(vm1.removed);
  throwsErrno(() => vm1.rmdir(), 'ENOENT');
  throwsErrno(() => vm1.mkdir('x'), 'ENOENT');
  throwsErrno(() => host.cgroup('/machine/vm1'), 'ENOENT');
  assert.equal(vm1.pinnedBytes, 1n * MiB, 'the dying cgroup keeps its charge');
  assert.equal(machine.pinnedBytes, 1n * MiB);
  const again = machine.mkdir('vm1');
  assert.notEqual(again, vm1);
  throwsErrno(() => again.chargePinned(2 * PAGES_PER_MIB), 'ENOMEM');
  vm1.unchargePinned(PAGES_PER_MIB);
  assert.equal(machine.pinnedPages, 0);
  again.chargePinned(2 * PAGES_PER_MIB);
});

/**
 * The seed-003 accounting scenarios with the softvfio opt-in extensions: cgroups with a
 * hierarchical pinned-memory limit and the per-context limit (IOMMU_OPTION_SOFTVFIO_CONTEXT_LIMIT).
 * Guest RAM is lazily backed: pinning 4 GiB touches no byte.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  type Capability,
  type Cgroup,
  Host,
  type Process,
  RLIM_INFINITY,
} from '../../../src/kernel/host/index.js';
import { IommufdContext } from '../../../src/kernel/iommufd/index.js';
import { isErrno } from '../../../src/uapi/error.js';
import { IommuOption, IommuOptionOp, SoftvfioIommuOption } from '../../../src/uapi/iommufd.js';
import { FIXED, GiB, MiB, RW, U64_MAX } from './helpers.js';

const PAGES_PER_GiB = 1 << 18;
const PAGE = 4096n;

/** The inner step an ENOMEM comes from: which limit refused the pin. */
const LIMIT_OP = {
  rlimit: ['incr_user_locked_vm', 'account_locked_vm'],
  context: ['softvfio_context_charge'],
  cgroup: ['pinned_cgroup_charge'],
} as const;

/** ENOMEM, and refused by `by`. */
function refused(fn: () => unknown, by: keyof typeof LIMIT_OP): void {
  assert.throws(fn, (e: unknown) => {
    if (!isErrno(e, 'ENOMEM')) throw e;
    const op = (e as { op?: string }).op ?? '';
    assert.ok((LIMIT_OP[by] as readonly string[]).includes(op), `refused by ${by}, not by ${op}`);
    return true;
  });
}

interface VmmOptions {
  cgroup?: Cgroup;
  perMm?: boolean;
  contextLimitBytes?: bigint;
  rlimitMemlockBytes?: bigint;
  caps?: Capability[];
  uid?: number;
}

/** A host with `/machine` (optionally limited) and a privileged management process (libvirt). */
function machineHost(machineLimitBytes?: bigint) {
  const host = new Host();
  const machine = host.rootCgroup.mkdir('machine', { pinnedLimitBytes: machineLimitBytes });
  const libvirt = host.spawn({ uid: 0, caps: ['CAP_SYS_RESOURCE'] });
  return { host, machine, libvirt };
}

/**
 * What libvirt does: spawn the VMM (uid 107, RLIMIT_MEMLOCK 4 GiB by default) in its cgroup, open
 * /dev/iommu itself, set the fd's options with its privileges and hand the fd over; the VMM then
 * allocates an IOAS and attaches its device, so every map pins at once.
 */
function startVmm(host: Host, libvirt: Process, o: VmmOptions = {}) {
  const p = host.spawn({
    uid: o.uid ?? 107,
    rlimitMemlockBytes: o.rlimitMemlockBytes ?? 4n * GiB,
    caps: o.caps ?? [],
    ...(o.cgroup ? { cgroup: o.cgroup } : {}),
  });
  const fd = IommufdContext.open(libvirt);
  if (o.perMm)
    fd.option({ optionId: IommuOption.RLIMIT_MODE, op: IommuOptionOp.SET, objectId: 0, val64: 1n });
  if (o.contextLimitBytes !== undefined) {
    fd.option({
      optionId: SoftvfioIommuOption.CONTEXT_LIMIT,
      op: IommuOptionOp.SET,
      objectId: 0,
      val64: o.contextLimitBytes,
    });
  }
  return withDevice(fd.as(p), p);
}

/** An IOAS with a device attached on `ctx`; `map` maps fresh anonymous memory of `who` (default `p`). */
function withDevice(ctx: IommufdContext, p: Process) {
  const ioas = ctx.ioasAlloc().outIoasId;
  ctx.attachIoas({ devId: ctx.bindDevice({ name: `vf${p.pid}` }).outDevid, ptId: ioas });
  let nextIova = 0n;
  const map = (bytes = 4n * GiB, who: Process = p): bigint => {
    const va = who.mmap({ lengthBytes: bytes });
    const iova = nextIova;
    nextIova += bytes;
    ctx.as(who).ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: bytes, iova });
    return iova;
  };
  const unmap = (iova: bigint, bytes: bigint) => ctx.ioasUnmap({ ioasId: ioas, iova, length: bytes });
  return { p, ctx, ioas, map, unmap };
}

function contextPinned(ctx: IommufdContext): bigint {
  return ctx.option({
    optionId: SoftvfioIommuOption.CONTEXT_PINNED,
    op: IommuOptionOp.GET,
    objectId: 0,
    val64: 0n,
  }).val64;
}

// ---- two VMMs under one uid ------------------------------------------------------------------

test('seed 003 + cgroups: per-VM limits for two VMMs of one uid (vm1, vm2 under /machine, 4 GiB each)', () => {
  // libvirt's plan from the thread: RLIMIT_MEMLOCK unlimited, the sandbox made of cgroups.
  const { host, machine, libvirt } = machineHost();
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const vm2 = machine.mkdir('vm2', { pinnedLimitBytes: 4n * GiB });
  const a = startVmm(host, libvirt, { cgroup: vm1, rlimitMemlockBytes: RLIM_INFINITY });
  const b = startVmm(host, libvirt, { cgroup: vm2, rlimitMemlockBytes: RLIM_INFINITY });
  a.map();
  b.map();
  assert.equal(a.p.user, b.p.user);
  assert.equal(a.p.user.lockedVm, 2 * 4 * PAGES_PER_GiB, 'per-user mode: both charged to uid 107');
  assert.equal(vm1.pinnedBytes, 4n * GiB);
  assert.equal(vm2.pinnedBytes, 4n * GiB);
  assert.equal(machine.pinnedBytes, 8n * GiB);
  // Each VM is held to its own 4 GiB, whatever the other does.
  refused(() => a.map(PAGE), 'cgroup');
  refused(() => b.map(PAGE), 'cgroup');
  assert.equal(vm1.pinnedMaxEvents, 1);
  assert.equal(vm2.pinnedMaxEvents, 1);
  assert.equal(a.p.user.lockedVm, 8 * PAGES_PER_GiB, 'the refused maps left no charge');
  assert.equal(a.p.mm.pinnedVm, 4 * PAGES_PER_GiB);
  assert.equal(a.p.mm.regions[0]!.store.residentBytes, 0, 'pinning touched no byte');
  // vm2 shrinking makes no room for vm1.
  b.unmap(0n, 4n * GiB);
  refused(() => a.map(PAGE), 'cgroup');
});

test('seed 003 + cgroups: /machine at 6 GiB caps the total; the second 4 GiB VM fails ENOMEM even per-mm', () => {
  const { host, machine, libvirt } = machineHost(6n * GiB);
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const vm2 = machine.mkdir('vm2', { pinnedLimitBytes: 4n * GiB });
  const a = startVmm(host, libvirt, { cgroup: vm1, perMm: true });
  const b = startVmm(host, libvirt, { cgroup: vm2, perMm: true });
  a.map();
  refused(() => b.map(), 'cgroup');
  assert.equal(machine.pinnedMaxEvents, 1, '/machine refused it');
  assert.equal(vm2.pinnedMaxEvents, 0);
  assert.equal(vm2.pinnedBytes, 0n);
  assert.equal(machine.pinnedBytes, 4n * GiB);
  assert.equal(b.p.mm.lockedVm, 0, 'the per-mm charge was undone');
  assert.equal(b.p.mm.pinnedVm, 0);
  assert.equal(b.unmap(0n, U64_MAX).length, 0n, 'the map was undone');
  // What is left under /machine fits a 2 GiB VM.
  b.map(2n * GiB);
  assert.equal(machine.pinnedBytes, 6n * GiB);
  assert.equal(b.p.mm.lockedVm, 2 * PAGES_PER_GiB);
});

test('cgroups: CAP_IPC_LOCK (mode NONE) skips RLIMIT_MEMLOCK but not the cgroup limit', () => {
  const { host, machine, libvirt } = machineHost();
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const a = startVmm(host, libvirt, { cgroup: vm1, caps: ['CAP_IPC_LOCK'], rlimitMemlockBytes: 0n });
  a.map();
  assert.equal(a.p.user.lockedVm, 0);
  assert.equal(a.p.mm.lockedVm, 0);
  assert.equal(vm1.pinnedBytes, 4n * GiB);
  refused(() => a.map(PAGE), 'cgroup');
  assert.equal(a.p.mm.pinnedVm, 4 * PAGES_PER_GiB);
  a.unmap(0n, 4n * GiB);
  assert.equal(vm1.pinnedBytes, 0n);
  assert.equal(a.p.mm.pinnedVm, 0);
});

// ---- fork and exec ---------------------------------------------------------------------------

test('fork escapes per-mm accounting (each child has its own mm); the cgroup closes the hole', () => {
  // Without the extension: 4 GiB RLIMIT_MEMLOCK, per-mm, yet one VM pins 12 GiB.
  {
    const { host, libvirt } = machineHost();
    const vmm = startVmm(host, libvirt, { perMm: true });
    vmm.map();
    refused(() => vmm.map(PAGE), 'rlimit');
    const child = vmm.p.fork();
    assert.equal(child.mm.lockedVm, 0, "the child's mm starts at 0");
    vmm.map(4n * GiB, child); // through the inherited fd
    const own = withDevice(IommufdContext.open(child), child); // a fd of its own
    own.map();
    assert.equal(vmm.p.mm.pinnedVm + child.mm.pinnedVm, 3 * 4 * PAGES_PER_GiB);
  }
  // With it: the child is in the VM's cgroup and every pin of it counts there.
  {
    const { host, machine, libvirt } = machineHost();
    const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
    const vmm = startVmm(host, libvirt, { perMm: true, cgroup: vm1 });
    vmm.map();
    const child = vmm.p.fork();
    assert.equal(child.cgroup, vm1);
    refused(() => vmm.map(4n * GiB, child), 'cgroup');
    refused(() => withDevice(IommufdContext.open(child), child).map(), 'cgroup');
    assert.equal(vm1.pinnedMaxEvents, 2);
    assert.equal(vm1.pinnedBytes, 4n * GiB);
    assert.equal(child.mm.lockedVm, 0);
    assert.equal(child.mm.pinnedVm, 0);
    // A grandchild is no way out either.
    const grandchild = child.fork();
    assert.equal(grandchild.cgroup, vm1);
    refused(() => vmm.map(PAGE, grandchild), 'cgroup');
  }
});

test('fork: the context limit counts every pin through the fd, whichever process maps', () => {
  const { host, libvirt } = machineHost();
  const vmm = startVmm(host, libvirt, { perMm: true, contextLimitBytes: 4n * GiB });
  vmm.map(2n * GiB);
  const child = vmm.p.fork();
  vmm.map(2n * GiB, child);
  assert.equal(contextPinned(vmm.ctx), 4n * GiB);
  assert.equal(vmm.p.mm.lockedVm, 2 * PAGES_PER_GiB, 'each mm is well under its RLIMIT_MEMLOCK');
  assert.equal(child.mm.lockedVm, 2 * PAGES_PER_GiB);
  refused(() => vmm.map(PAGE, child), 'context');
  // Any process the fd reaches (SCM_RIGHTS), of any uid, is held to the same budget.
  const stranger = host.spawn({ uid: 4242, rlimitMemlockBytes: RLIM_INFINITY });
  refused(() => vmm.map(PAGE, stranger), 'context');
  assert.equal(child.mm.lockedVm, 2 * PAGES_PER_GiB);
  assert.equal(stranger.mm.pinnedVm, 0);
  // The limit belongs to this fd: a fd the child opens itself is outside it (the sandbox must not
  // let the VMM open /dev/iommu, as in the thread; the cgroup limit covers every fd).
  withDevice(IommufdContext.open(child), child).map(1n * GiB);
  assert.equal(contextPinned(vmm.ctx), 4n * GiB);
});

test('exec: a fresh mm escapes per-mm accounting; the cgroup is kept and the context limit still counts', () => {
  // Without the extension: the pins of the old mm stay, the new mm starts at 0.
  {
    const { host, libvirt } = machineHost();
    const vmm = startVmm(host, libvirt, { perMm: true });
    vmm.map();
    const oldMm = vmm.p.mm;
    vmm.p.exec();
    assert.notEqual(vmm.p.mm, oldMm);
    assert.equal(vmm.p.mm.lockedVm, 0);
    assert.equal(oldMm.lockedVm, 4 * PAGES_PER_GiB, 'the old mm keeps its charge');
    vmm.map();
    assert.equal(oldMm.pinnedVm + vmm.p.mm.pinnedVm, 2 * 4 * PAGES_PER_GiB);
  }
  // The cgroup survives exec.
  {
    const { host, machine, libvirt } = machineHost();
    const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
    const vmm = startVmm(host, libvirt, { perMm: true, cgroup: vm1 });
    const before = vmm.map();
    const oldMm = vmm.p.mm;
    vmm.p.exec();
    assert.equal(vmm.p.cgroup, vm1);
    refused(() => vmm.map(), 'cgroup');
    assert.equal(vmm.p.mm.lockedVm, 0);
    // Unmapping what the old image mapped releases vm1 (the charge goes back where it was taken).
    vmm.unmap(before, 4n * GiB);
    assert.equal(vm1.pinnedBytes, 0n);
    assert.equal(oldMm.lockedVm, 0);
    vmm.map();
    assert.equal(vm1.pinnedBytes, 4n * GiB);
  }
  // The context limit survives exec (the fd does).
  {
    const { host, libvirt } = machineHost();
    const vmm = startVmm(host, libvirt, { perMm: true, contextLimitBytes: 4n * GiB });
    vmm.map();
    vmm.p.exec();
    refused(() => vmm.map(), 'context');
    assert.equal(vmm.p.mm.pinnedVm, 0);
    assert.equal(contextPinned(vmm.ctx), 4n * GiB);
  }
});

// ---- moving processes between cgroups --------------------------------------------------------

test('cgroup.attach moves no charge: pins go where the owner is when first pinned, back where taken', () => {
  const { host, machine, libvirt } = machineHost();
  const vm1 = machine.mkdir('vm1');
  const vm2 = machine.mkdir('vm2');
  const p = host.spawn({ uid: 107, rlimitMemlockBytes: 64n * MiB, cgroup: vm1 });
  const ctx = IommufdContext.open(libvirt).as(p);
  const ioas = ctx.ioasAlloc().outIoasId;
  const va = p.mmap({ lengthBytes: 2n * MiB });
  // A: mapped and partly pinned (one page, by an emulated device) while in vm1.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va, length: 1n * MiB, iova: 0n });
  const acc = ctx.accessCreate(ioas, {
    unmap: (iova, length) => {
      for (const [i, l] of acc.pinsIn(iova, length)) acc.accessUnpin(i, l);
    },
  });
  acc.accessPin(0n, PAGE);
  // B: mapped while in vm1, not pinned yet.
  ctx.ioasMap({ flags: FIXED | RW, ioasId: ioas, userVa: va + 1n * MiB, length: 1n * MiB, iova: 1n * MiB });
  assert.equal(vm1.pinnedPages, 1);
  vm2.attach(p);
  assert.equal(vm1.pinnedPages, 1, 'attach moved nothing');
  // The device pins everything: A's other pages join A's charge in vm1; B is charged to vm2.
  const dev = ctx.bindDevice({ name: 'vf' }).outDevid;
  ctx.attachIoas({ devId: dev, ptId: ioas });
  assert.equal(vm1.pinnedPages, 256);
  assert.equal(vm2.pinnedPages, 256);
  assert.equal(p.user.lockedVm, 512);
  ctx.ioasUnmap({ ioasId: ioas, iova: 0n, length: 1n * MiB });
  assert.equal(vm1.pinnedPages, 0, 'released to the cgroup that was charged');
  assert.equal(vm2.pinnedPages, 256);
  ctx.detach({ devId: dev });
  assert.equal(vm2.pinnedPages, 0);
  assert.equal(p.user.lockedVm, 0);
  assert.equal(machine.pinnedPages, 0);
});

// ---- live update: IOAS_CHANGE_PROCESS --------------------------------------------------------

/** An old VMM in `cgroup` with 4 GiB of guest RAM in a memfd, mapped with MAP_FILE (two halves if `split`). */
function liveUpdateRig(
  cgroup: Cgroup,
  host: Host,
  libvirt: Process,
  o: VmmOptions & { split?: boolean } = {},
) {
  const old = startVmm(host, libvirt, { cgroup, ...o });
  const memfd = old.p.memfdCreate(4n * GiB, 'guest-ram');
  const halves = o.split ? [0n, 2n * GiB] : [0n];
  const size = o.split ? 2n * GiB : 4n * GiB;
  for (const start of halves) {
    old.ctx.ioasMapFile({ flags: FIXED | RW, ioasId: old.ioas, fd: memfd, start, length: size, iova: start });
  }
  /** The new VMM binary: spawned by libvirt, gets the guest RAM memfd and the iommufd over SCM_RIGHTS. */
  const successor = (opts: { cgroup: Cgroup; uid?: number; rlimitMemlockBytes?: bigint }) => {
    const next = host.spawn({
      uid: opts.uid ?? 107,
      rlimitMemlockBytes: opts.rlimitMemlockBytes ?? 4n * GiB,
      cgroup: opts.cgroup,
    });
    next.installFd(old.p.file(memfd)!);
    return { p: next, ctx: old.ctx.as(next) };
  };
  return { old, memfd, successor };
}

test('live update, same cgroup: the per-mm charge moves to the new VMM, the cgroup charge stays put', () => {
  const { host, machine, libvirt } = machineHost(6n * GiB);
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const { old, successor } = liveUpdateRig(vm1, host, libvirt, { perMm: true });
  assert.equal(vm1.pinnedBytes, 4n * GiB, 'vm1 is at its limit');
  const next = successor({ cgroup: vm1 });
  next.ctx.ioasChangeProcess();
  assert.equal(old.p.mm.lockedVm, 0);
  assert.equal(old.p.mm.pinnedVm, 0);
  assert.equal(next.p.mm.lockedVm, 4 * PAGES_PER_GiB);
  assert.equal(next.p.mm.pinnedVm, 4 * PAGES_PER_GiB);
  assert.equal(vm1.pinnedBytes, 4n * GiB, 'not counted twice while moving');
  assert.equal(machine.pinnedBytes, 4n * GiB);
  old.p.exit();
  next.ctx.ioasUnmap({ ioasId: old.ioas, iova: 0n, length: U64_MAX });
  assert.equal(next.p.mm.lockedVm, 0);
  assert.equal(vm1.pinnedBytes, 0n);
});

test('live update, another cgroup: the per-user charge and the cgroup charge move; /machine is not counted twice', () => {
  const { host, machine, libvirt } = machineHost(6n * GiB);
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const vm1next = machine.mkdir('vm1-next', { pinnedLimitBytes: 4n * GiB });
  const { old, successor } = liveUpdateRig(vm1, host, libvirt);
  assert.equal(old.p.user.lockedVm, 4 * PAGES_PER_GiB);
  const next = successor({ cgroup: vm1next, uid: 108, rlimitMemlockBytes: 8n * GiB });
  next.ctx.ioasChangeProcess();
  assert.equal(old.p.user.lockedVm, 0);
  assert.equal(next.p.user.lockedVm, 4 * PAGES_PER_GiB);
  assert.equal(next.p.mm.pinnedVm, 4 * PAGES_PER_GiB);
  assert.equal(vm1.pinnedBytes, 0n);
  assert.equal(vm1next.pinnedBytes, 4n * GiB);
  assert.equal(machine.pinnedBytes, 4n * GiB, '4 + 4 would be over /machine, a move is not');
  old.p.exit();
  vm1.rmdir();
  // The guest keeps running on the new VMM: its pins are held to vm1-next's limit now.
  const more = next.p.memfdCreate(4096n);
  refused(
    () =>
      next.ctx.ioasMapFile({
        flags: FIXED | RW,
        ioasId: old.ioas,
        fd: more,
        start: 0n,
        length: PAGE,
        iova: 8n * GiB,
      }),
    'cgroup',
  );
  assert.equal(vm1next.pinnedMaxEvents, 1);
  next.ctx.ioasUnmap({ ioasId: old.ioas, iova: 0n, length: U64_MAX });
  assert.equal(vm1next.pinnedBytes, 0n);
  assert.equal(machine.pinnedBytes, 0n);
  assert.equal(next.p.user.lockedVm, 0);
});

test('live update failure: the new VMM over its cgroup limit or its RLIMIT_MEMLOCK is ENOMEM, nothing changed', () => {
  const { host, machine, libvirt } = machineHost(6n * GiB);
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const small = machine.mkdir('small', { pinnedLimitBytes: 3n * GiB });
  const roomy = machine.mkdir('roomy');
  // Two pages objects (2 GiB each): the first fits in `small`, the second does not; the first
  // move is undone.
  const { old, successor } = liveUpdateRig(vm1, host, libvirt, { perMm: true, split: true });
  const unchanged = () => {
    assert.equal(old.p.mm.lockedVm, 4 * PAGES_PER_GiB);
    assert.equal(old.p.mm.pinnedVm, 4 * PAGES_PER_GiB);
    assert.equal(vm1.pinnedBytes, 4n * GiB);
    assert.equal(small.pinnedBytes, 0n);
    assert.equal(roomy.pinnedBytes, 0n);
    assert.equal(machine.pinnedBytes, 4n * GiB);
  };
  const tooSmall = successor({ cgroup: small });
  refused(() => tooSmall.ctx.ioasChangeProcess(), 'cgroup');
  assert.equal(small.pinnedMaxEvents, 1);
  assert.equal(tooSmall.p.mm.lockedVm, 0);
  assert.equal(tooSmall.p.mm.pinnedVm, 0);
  unchanged();
  // Room in the cgroup, not in RLIMIT_MEMLOCK (per-mm) for the second half: the first half's
  // move (mm and cgroup) is undone.
  const lowRlimit = successor({ cgroup: roomy, rlimitMemlockBytes: 3n * GiB });
  refused(() => lowRlimit.ctx.ioasChangeProcess(), 'rlimit');
  assert.equal(lowRlimit.p.mm.lockedVm, 0);
  unchanged();
  // The old VMM still owns everything: a successor that fits takes it all.
  const good = successor({ cgroup: roomy });
  good.ctx.ioasChangeProcess();
  assert.equal(old.p.mm.lockedVm, 0);
  assert.equal(good.p.mm.lockedVm, 4 * PAGES_PER_GiB);
  assert.equal(vm1.pinnedBytes, 0n);
  assert.equal(roomy.pinnedBytes, 4n * GiB);
  assert.equal(machine.pinnedBytes, 4n * GiB);
});

test("live update the seed-003 way (fork, CHANGE_PROCESS, exec, CHANGE_PROCESS): fine at the VM's cgroup limit", () => {
  const { host, machine, libvirt } = machineHost();
  const vm1 = machine.mkdir('vm1', { pinnedLimitBytes: 4n * GiB });
  const { old } = liveUpdateRig(vm1, host, libvirt, { perMm: true });
  const qemu = old.p;
  // The child holds the pins (as their owner) while the parent execs.
  const child = qemu.fork();
  old.ctx.as(child).ioasChangeProcess();
  assert.deepEqual([qemu.mm.lockedVm, child.mm.lockedVm], [0, 4 * PAGES_PER_GiB]);
  qemu.exec();
  old.ctx.as(qemu).ioasChangeProcess();
  assert.deepEqual([qemu.mm.lockedVm, child.mm.lockedVm], [4 * PAGES_PER_GiB, 0]);
  child.exit();
  assert.equal(vm1.pinnedBytes, 4n * GiB, 'never counted twice in vm1');
  assert.equal(qemu.cgroup, vm1);
  // The fork did not buy the VM more room.
  refused(() => startVmm(host, libvirt, { cgroup: vm1, perMm: true }).map(PAGE), 'cgroup');
});

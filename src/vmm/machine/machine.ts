import { createHash } from 'node:crypto';
import { createAccelDevice } from '../../devices/accel-device.js';
import { createBasicDevice } from '../../devices/basic-device.js';
import { createNicDevice } from '../../devices/nic-device.js';
import type { SampleDevice } from '../../devices/sample-device.js';
import type { StateDriver } from '../../devices/state/state-driver.js';
import type { Host, Process } from '../../kernel/host/host.js';
import { DmaPort } from '../../kernel/vfio/dma-port.js';
import { invalidArgument, VfioError } from '../../uapi/error.js';
import { MigFeature, MigState, migStateName } from '../../uapi/migration.js';
import { CountingDmaSpace, type DeviceDmaCounters } from './counting-dma-space.js';
import type { VmDmaBackend } from './dma-backend.js';
import { GuestDriverLoop, type GuestDriverTarget } from './guest-driver-loop.js';
import { GuestRam } from './guest-ram.js';
import { NicGuestTxDriver, type NicGuestTxState } from './nic-guest-driver.js';
import { IommufdBackend } from './iommufd-backend.js';
import {
  type GuestBufferPlacement,
  type MachineDefinition,
  type MachineDeviceDefinition,
  type ResolvedMachineDefinition,
  DEFAULT_NIC_RING,
  resolveMachineDefinition,
} from './machine-definition.js';
import { type AccountingMode, type IommuBackendKind, MachineFailedError } from './machine-errors.js';
import { MediatedDevice, type MediatedDeviceStatus } from './mediated-device.js';
import { addMemfdRamBlock, type MemfdRamBlock, releaseMemfdRamBlock } from './memfd-ram.js';
import { VfioMemoryListener } from './memory-listener.js';
import type { RamDiscardManager } from './ram-discard.js';
import { Type1Backend } from './type1-backend.js';
import { VcpuSet, type VcpuTotals } from './vcpu-set.js';

/**
 * - created: built (process, RAM, devices), nothing mapped, no vCPU thread;
 * - running: RAM mapped, devices attached and given work, vCPUs writing;
 * - stopped: vCPUs paused, device work stopped, devices still attached and RAM mapped;
 * - failed: a start was refused (everything it set up undone) or the VM stopped on a run-time
 *   error (vCPUs paused, device work stopped, mappings kept for inspection); see `error`;
 * - incoming: the destination of a migration: RAM mapped, devices attached, vCPUs created paused,
 *   no device work; the migration loads its state, then the VM runs or stops ('stopped');
 * - migrated: the source after a migration's hand-off: stopped for good (the VM runs elsewhere);
 * - destroyed: every fd closed, the VMM process gone.
 */
export type MachineState =
  'created' | 'starting' | 'running' | 'stopped' | 'incoming' | 'migrated' | 'failed' | 'destroyed';

/** An assigned device of the VM. */
export interface MachineDevice {
  readonly name: string;
  readonly type: MachineDeviceDefinition['type'];
  /** The sample device, with its state driver (registers, regions) for inspection. */
  readonly device: SampleDevice & { driver: StateDriver };
  /** Its DMA space as the VMM counts it (bytes, faults); attached to the backend while started. */
  readonly dma: CountingDmaSpace;
  /** Its buffer in guest RAM (nic RX and TX rings, accel job buffer); none for the basic device. */
  readonly buffer: GuestBufferPlacement | undefined;
  readonly workUnitsPerTick: number;
  /** The guest's TX driver of a nic: posts packets to its TX ring every tick. */
  readonly guestTx: NicGuestTxDriver | undefined;
}

export interface MachineDeviceStatus extends DeviceDmaCounters {
  name: string;
  type: MachineDeviceDefinition['type'];
  /** The device's VFIO migration state ('RUNNING', …), 'closed' once the VM is destroyed. */
  migrationState: string;
}

export interface MachineStatus {
  name: string;
  state: MachineState;
  error: { code: string; message: string } | undefined;
  iommu: IommuBackendKind;
  accounting: AccountingMode;
  ram: {
    totalBytes: number;
    /** Guest RAM mapped for device DMA now. */
    mappedBytes: number;
    /** DMA mappings the kernel holds (IOAS areas, type1 vfio_dma). */
    mappings: number;
    blocks: { name: string; gpa: bigint; sizeBytes: number; pluggedBytes: number }[];
  };
  vcpus: { count: number; state: 'none' | 'running' | 'paused' | 'terminated' } & VcpuTotals;
  devices: MachineDeviceStatus[];
  emulatedDevices: MediatedDeviceStatus[];
  /** DMA faults of every assigned device. */
  dmaFaults: number;
  /** Guest RAM bytes written since creation, by who wrote them. */
  bytesDirtied: { vcpus: number; deviceDma: number; emulatedDevices: number; total: number };
  /** Pages charged where the accounting mode charges (0 when not started). */
  lockedPages: number;
}

/** What deviceConfigState carries (JSON). */
interface DeviceConfigState {
  dma: DeviceDmaCounters;
  guestTx: NicGuestTxState | undefined;
}

export type MachineStateListener = (state: MachineState, error: VfioError | undefined) => void;

const ZERO_TOTALS: VcpuTotals = { bytesWritten: 0, pageWrites: 0, pagesSkipped: 0, throttledMs: 0, runMs: 0 };

/**
 * A VM on a software host (the QEMU process and what it sets up): a VMM process with
 * RLIMIT_MEMLOCK, uid and capabilities as defined; guest RAM as memfds of that process mapped
 * shared (the bytes vCPU workers, the VMM and device DMA all reach); assigned sample devices with
 * their rings and buffers in guest RAM; emulated devices that pin guest pages; an IOMMU backend
 * (iommufd or type1) and the VFIO memory listener mapping RAM into it at IOVA = GPA.
 *
 * `start()` opens the backend (devices bound and attached), registers the listener (the mapping
 * limit is checked, RAM is mapped and pinned: a refusal is an error, the VM does not start and
 * nothing stays mapped or charged), connects emulated devices, starts the vCPUs and the guest
 * driver loop. `stop()` pauses vCPUs and device work; `start()` again resumes. A mapping failure
 * while running (a plug that cannot be mapped) stops the VM: state 'failed', `error` set.
 */
export class Machine {
  readonly name: string;
  readonly host: Host;
  readonly definition: ResolvedMachineDefinition;
  /** The VMM process (QEMU). */
  readonly process: Process;
  readonly ram: GuestRam;
  /** The RAM blocks with their memfds, in definition order. */
  readonly memfds: readonly MemfdRamBlock[];
  readonly #devices: MachineDevice[];
  readonly #emulated: MediatedDevice[];
  readonly #loop: GuestDriverLoop;
  readonly #listeners = new Set<MachineStateListener>();
  #state: MachineState = 'created';
  #error: VfioError | undefined;
  #backend: VmDmaBackend | undefined;
  #listener: VfioMemoryListener | undefined;
  #vcpus: VcpuSet | undefined;
  #vcpuTotals: VcpuTotals = ZERO_TOTALS;
  #serial: Promise<unknown> = Promise.resolve();
  /** The pause a run-time failure started, for those who want to wait for it. */
  #failing: Promise<void> = Promise.resolve();

  private constructor(
    host: Host,
    definition: ResolvedMachineDefinition,
    process: Process,
    ram: GuestRam,
    memfds: MemfdRamBlock[],
  ) {
    this.name = definition.name;
    this.host = host;
    this.definition = definition;
    this.process = process;
    this.ram = ram;
    this.memfds = memfds;
    this.#devices = definition.devices.map((d) => buildDevice(d, definition.buffers.get(d.name), ram));
    this.#emulated = definition.emulatedDevices.map(
      (e) =>
        new MediatedDevice({
          name: e.name,
          iova: definition.buffers.get(e.name)!.gpa,
          ...(e.pages === undefined ? {} : { pages: e.pages }),
          ...(e.seed === undefined ? {} : { seed: e.seed }),
        }),
    );
    const targets: GuestDriverTarget[] = [
      ...this.#devices.map((d) => ({
        name: d.name,
        tick: () => {
          d.guestTx?.tick();
          d.device.work(d.workUnitsPerTick);
        },
      })),
      ...this.#emulated.map((e) => ({ name: e.name, tick: () => e.tick() })),
    ];
    this.#loop = new GuestDriverLoop(targets, {
      intervalMs: definition.guestDriverIntervalMs,
      onError: (target, err) =>
        this.#fail(
          new MachineFailedError(
            this.name,
            `device ${target} failed: ${(err as Error)?.message ?? err}`,
            err,
          ),
        ),
    });
  }

  /** Build a VM on `host`: the VMM process, guest RAM (memfds mapped shared), the devices. Nothing runs yet. */
  static create(host: Host, definition: MachineDefinition): Machine {
    const def = resolveMachineDefinition(definition);
    const process = host.spawn({
      uid: def.uid,
      rlimitMemlockBytes: def.memlockLimitBytes,
      caps: def.accounting === 'none' ? ['CAP_IPC_LOCK'] : [],
      ...(def.cgroup === undefined ? {} : { cgroup: def.cgroup }),
    });
    const ram = new GuestRam();
    const memfds: MemfdRamBlock[] = [];
    try {
      for (const b of def.ram) {
        memfds.push(
          addMemfdRamBlock(process, ram, {
            name: b.name,
            sizeBytes: b.sizeBytes,
            gpa: b.gpa,
            ...(b.discard === undefined ? {} : { discard: b.discard }),
          }),
        );
      }
      return new Machine(host, def, process, ram, memfds);
    } catch (err) {
      for (const m of memfds) releaseMemfdRamBlock(process, m);
      process.exit();
      throw err;
    }
  }

  get state(): MachineState {
    return this.#state;
  }

  /** Why the VM failed (state 'failed'). */
  get error(): VfioError | undefined {
    return this.#error;
  }

  /** The IOMMU backend while started (IOAS / container introspection). */
  get backend(): VmDmaBackend | undefined {
    return this.#backend;
  }

  get listener(): VfioMemoryListener | undefined {
    return this.#listener;
  }

  get vcpus(): VcpuSet | undefined {
    return this.#vcpus;
  }

  get devices(): readonly MachineDevice[] {
    return this.#devices;
  }

  get emulatedDevices(): readonly MediatedDevice[] {
    return this.#emulated;
  }

  device(name: string): MachineDevice {
    const d = this.#devices.find((x) => x.name === name);
    if (d === undefined) throw invalidArgument(`VM ${this.name} has no device ${name}`);
    return d;
  }

  emulatedDevice(name: string): MediatedDevice {
    const d = this.#emulated.find((x) => x.name === name);
    if (d === undefined) throw invalidArgument(`VM ${this.name} has no emulated device ${name}`);
    return d;
  }

  /** Hear every state change (and the error of 'failed'); returns the function that stops it. */
  onStateChange(listener: MachineStateListener): () => void {
    this.#listeners.add(listener);
    return () => void this.#listeners.delete(listener);
  }

  /**
   * Start the VM (from 'created'), or resume it (from 'stopped'). A start the kernel refuses
   * (mapping limit, pin accounting, a map error) rejects with that error, leaves nothing mapped,
   * attached or charged, and the VM 'failed'.
   */
  start(): Promise<void> {
    return this.#serialized(async () => {
      if (this.#state === 'stopped') return this.#resume();
      if (this.#state !== 'created') throw invalidArgument(`VM ${this.name} is ${this.#state}, cannot start`);
      await this.#bringUpOrFail({ paused: false });
      this.#setState('running');
    });
  }

  /**
   * Bring the VM up as the destination of a migration (QEMU started with -incoming): RAM mapped
   * and pinned, devices attached, vCPUs created paused, no device work: state 'incoming'. A
   * refusal leaves the VM 'failed', as start() does.
   */
  startIncoming(): Promise<void> {
    return this.#serialized(async () => {
      if (this.#state !== 'created')
        throw invalidArgument(`VM ${this.name} is ${this.#state}, cannot take a migration`);
      await this.#bringUpOrFail({ paused: true });
      this.#setState('incoming');
    });
  }

  /**
   * The incoming state is loaded and the source handed the VM off: run it (devices to RUNNING,
   * P2P-capable ones through RUNNING_P2P first, then vCPUs and device work) or, without
   * `autostart`, leave it 'stopped' (QEMU's -S) for a later start().
   */
  finishIncoming(options: { autostart: boolean }): Promise<void> {
    return this.#serialized(async () => {
      if (this.#state !== 'incoming')
        throw invalidArgument(`VM ${this.name} is ${this.#state}, not incoming`);
      if (options.autostart) await this.#resume();
      else this.#setState('stopped');
    });
  }

  /**
   * The incoming migration failed before the hand-off: drop what it loaded. Devices are reset,
   * guest RAM is zeroed, everything is torn down: the VM is 'created' again, ready for another.
   */
  discardIncoming(): Promise<void> {
    return this.#serialized(async () => {
      if (this.#state !== 'incoming')
        throw invalidArgument(`VM ${this.name} is ${this.#state}, not incoming`);
      let failure = await this.#tearDown();
      for (const d of this.#devices) {
        try {
          d.device.vfio.reset();
        } catch (err) {
          failure ??= err;
        }
        Object.assign(d.dma.counters, { bytesRead: 0, bytesWritten: 0, faults: 0 });
      }
      for (const b of this.ram.blocks) b.memory.fill(0);
      this.#vcpuTotals = ZERO_TOTALS;
      this.#setState('created');
      if (failure !== undefined) throw failure;
    });
  }

  /** The source after a migration's hand-off: from 'stopped' to 'migrated'; only destroy is left. */
  markMigrated(): void {
    if (this.#state !== 'stopped') throw invalidArgument(`VM ${this.name} is ${this.#state}, not stopped`);
    this.#setState('migrated');
  }

  /** The VMM's own state of an assigned device (counters, the guest driver's position), for migration. */
  deviceConfigState(name: string): Uint8Array {
    const d = this.device(name);
    const state: DeviceConfigState = { dma: { ...d.dma.counters }, guestTx: d.guestTx?.state() };
    return new TextEncoder().encode(JSON.stringify(state));
  }

  /** Load what deviceConfigState gave on the source; ERR_INVALID_ARGUMENT if it does not fit. */
  loadDeviceConfigState(name: string, data: Uint8Array): void {
    const d = this.device(name);
    let state: DeviceConfigState;
    try {
      state = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(data)) as DeviceConfigState;
    } catch (err) {
      throw invalidArgument(`device ${name}: config state is not JSON: ${(err as Error).message}`);
    }
    const counters = state?.dma;
    const valid = (x: unknown) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
    if (!counters || !valid(counters.bytesRead) || !valid(counters.bytesWritten) || !valid(counters.faults)) {
      throw invalidArgument(`device ${name}: config state has no valid DMA counters`);
    }
    if ((state.guestTx === undefined) !== (d.guestTx === undefined)) {
      throw invalidArgument(`device ${name}: config state ${d.guestTx ? 'lacks' : 'has'} a guest TX driver`);
    }
    if (state.guestTx !== undefined) d.guestTx!.restore(state.guestTx);
    Object.assign(d.dma.counters, {
      bytesRead: counters.bytesRead,
      bytesWritten: counters.bytesWritten,
      faults: counters.faults,
    });
  }

  /** Pause the vCPUs and stop device work; devices stay attached and RAM mapped. */
  stop(): Promise<void> {
    return this.#serialized(async () => {
      if (this.#state === 'stopped') return;
      if (this.#state !== 'running') throw invalidArgument(`VM ${this.name} is ${this.#state}, cannot stop`);
      this.#loop.stop();
      await this.#vcpus!.pause();
      this.#setState('stopped');
    });
  }

  /**
   * Plug blocks of a discardable region (the guest's virtio-mem driver asking). If the listener
   * cannot map them the plug is refused, the VM stops ('failed') and this rejects with the error
   * once the vCPUs are paused.
   */
  async plug(ramBlock: string, first: number, count = 1): Promise<void> {
    await this.#discardChange(ramBlock, (m) => m.plug(first, count));
  }

  /** Unplug blocks of a discardable region (mappings go first); a failed unmap stops the VM. */
  async unplug(ramBlock: string, first: number, count = 1): Promise<void> {
    await this.#discardChange(ramBlock, (m) => m.unplug(first, count));
  }

  async #discardChange(ramBlock: string, change: (manager: RamDiscardManager) => void): Promise<void> {
    const manager = this.ram.block(ramBlock).discard;
    if (manager === undefined) throw invalidArgument(`RAM block ${ramBlock} is not discardable`);
    if (this.#state === 'destroyed') throw invalidArgument(`VM ${this.name} is destroyed`);
    try {
      change(manager);
    } catch (err) {
      await this.#failing;
      throw err;
    }
  }

  /** Tear everything down: vCPU threads end, devices detach, RAM unmapped, fds closed, process exits. */
  destroy(): Promise<void> {
    return this.#serialized(async () => {
      if (this.#state === 'destroyed') return;
      await this.#failing;
      let failure = await this.#tearDown();
      for (const d of this.#devices) {
        try {
          d.device.vfio.close();
        } catch (err) {
          failure ??= err;
        }
      }
      for (const m of this.memfds) releaseMemfdRamBlock(this.process, m);
      this.process.exit();
      this.#setState('destroyed');
      if (failure !== undefined) throw failure;
    });
  }

  /**
   * The VM digest: SHA-256 over the guest RAM digest and every assigned device's digest, devices
   * sorted by name. Equal digests = equal guest RAM and equal device state.
   */
  digest(): string {
    const hash = createHash('sha256');
    hash.update(`ram\0${this.ram.digest()}\0`);
    const sorted = [...this.#devices].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const d of sorted) hash.update(`${d.name}\0${d.device.digest()}\0`);
    return hash.digest('hex');
  }

  status(): MachineStatus {
    const vcpuTotals = this.#vcpus?.totals() ?? this.#vcpuTotals;
    const devices: MachineDeviceStatus[] = this.#devices.map((d) => ({
      name: d.name,
      type: d.type,
      migrationState:
        this.#state === 'destroyed' ? 'closed' : migStateName(d.device.vfio.getMigDeviceState()),
      ...d.dma.counters,
    }));
    const emulatedDevices = this.#emulated.map((e) => e.status());
    const deviceDma = devices.reduce((n, d) => n + d.bytesWritten, 0);
    const emulatedBytes = emulatedDevices.reduce((n, e) => n + e.bytesWritten, 0);
    const mappings = this.#backend?.mappings() ?? [];
    return {
      name: this.name,
      state: this.#state,
      error: this.#error === undefined ? undefined : { code: this.#error.code, message: this.#error.message },
      iommu: this.definition.iommu,
      accounting: this.definition.accounting,
      ram: {
        totalBytes: this.ram.totalBytes,
        mappedBytes: this.#listener?.mappedBytes ?? 0,
        mappings: mappings.length,
        blocks: this.ram.blocks.map((b) => ({
          name: b.name,
          gpa: b.gpa,
          sizeBytes: b.sizeBytes,
          pluggedBytes: b.discard === undefined ? b.sizeBytes : b.discard.pluggedBytes,
        })),
      },
      vcpus: {
        count: this.definition.vcpuCount,
        state: this.#vcpus?.runState ?? (this.#vcpuTotals === ZERO_TOTALS ? 'none' : 'terminated'),
        ...vcpuTotals,
      },
      devices,
      emulatedDevices,
      dmaFaults: devices.reduce((n, d) => n + d.faults, 0),
      bytesDirtied: {
        vcpus: vcpuTotals.bytesWritten,
        deviceDma,
        emulatedDevices: emulatedBytes,
        total: vcpuTotals.bytesWritten + deviceDma + emulatedBytes,
      },
      lockedPages: this.#backend?.lockedPages() ?? 0,
    };
  }

  // ---- internals ------------------------------------------------------------------------------

  /** 'starting', then bring up; a refusal undoes everything, leaves the VM 'failed' and rejects. */
  async #bringUpOrFail(options: { paused: boolean }): Promise<void> {
    this.#setState('starting');
    try {
      await this.#bringUp(options);
    } catch (err) {
      await this.#tearDown();
      const error = err instanceof VfioError ? err : new MachineFailedError(this.name, String(err), err);
      this.#error = error;
      this.#setState('failed');
      throw error;
    }
  }

  async #bringUp(options: { paused: boolean }): Promise<void> {
    const def = this.definition;
    const assigned = this.#devices.map((d) => ({
      name: d.name,
      iommuDirtyTracking: def.devices.find((x) => x.name === d.name)!.iommuDirtyTracking ?? true,
    }));
    const needsBackend = assigned.length + this.#emulated.length > 0;
    if (needsBackend) {
      this.#backend =
        def.iommu === 'iommufd'
          ? IommufdBackend.open(this.process, { devices: assigned, accountingMode: def.accounting })
          : Type1Backend.open(this.process, {
              devices: assigned,
              emulatedDevices: this.#emulated.map((e) => e.name),
              accountingMode: def.accounting,
            });
      const backend = this.#backend;
      this.#listener = new VfioMemoryListener({
        vm: this.name,
        blocks: this.memfds,
        backend,
        process: this.process,
        maxMemslots: def.maxMemslots,
        onFatal: (err) => this.#fail(err),
      });
      this.#listener.register();
      for (const d of this.#devices) d.dma.attach(backend.deviceSpace(d.name));
      for (const e of this.#emulated) {
        e.connect(backend.openEmulatedDevice(e.name, (iova, length) => e.onUnmap(iova, length)));
      }
    }
    this.#vcpus = await VcpuSet.start(this.ram, {
      count: def.vcpuCount,
      workload: def.vcpuWorkload,
      startPaused: options.paused,
    });
    if (!options.paused) this.#loop.start();
  }

  async #resume(): Promise<void> {
    this.#runDevices();
    await this.#vcpus!.resume();
    this.#loop.start();
    this.#setState('running');
  }

  /**
   * Devices a migration left stopped (a destination loads them into STOP) go to RUNNING as QEMU's
   * VM start does: every P2P-capable device to RUNNING_P2P first, then all to RUNNING.
   */
  #runDevices(): void {
    const stopped = this.#devices.filter((d) => d.device.vfio.getMigDeviceState() !== MigState.RUNNING);
    for (const d of stopped) {
      if ((d.device.vfio.getMigration().flags & BigInt(MigFeature.P2P)) !== 0n) {
        d.device.vfio.setMigDeviceState(MigState.RUNNING_P2P);
      }
    }
    for (const d of stopped) d.device.vfio.setMigDeviceState(MigState.RUNNING);
  }

  /** Undo a bring-up, whatever part of it happened; returns the first failure (after trying everything). */
  async #tearDown(): Promise<unknown> {
    let failure: unknown;
    const attempt = async (step: () => unknown) => {
      try {
        await step();
      } catch (err) {
        failure ??= err;
      }
    };
    this.#loop.stop();
    const vcpus = this.#vcpus;
    if (vcpus !== undefined) {
      await attempt(() => vcpus.terminate());
      this.#vcpuTotals = vcpus.totals();
      this.#vcpus = undefined;
    }
    for (const e of this.#emulated) await attempt(() => e.disconnect());
    for (const d of this.#devices) d.dma.attach(undefined);
    const listener = this.#listener;
    if (listener !== undefined) await attempt(() => listener.unregister());
    const backend = this.#backend;
    if (backend !== undefined) await attempt(() => backend.close());
    this.#backend = undefined;
    return failure;
  }

  /** A run-time failure: record it, stop device work, pause the vCPUs (in the background). */
  #fail(err: VfioError): void {
    if (this.#state !== 'running' && this.#state !== 'stopped') return;
    this.#error = err;
    this.#loop.stop();
    this.#setState('failed');
    const vcpus = this.#vcpus;
    this.#failing = this.#serialized(async () => {
      if (vcpus !== undefined && vcpus.runState === 'running') await vcpus.pause();
    }).catch(() => undefined);
  }

  #setState(state: MachineState): void {
    this.#state = state;
    for (const listener of this.#listeners) listener(state, state === 'failed' ? this.#error : undefined);
  }

  #serialized<T>(op: () => Promise<T>): Promise<T> {
    const run = this.#serial.then(op, op);
    this.#serial = run.catch(() => undefined);
    return run;
  }
}

function buildDevice(
  def: MachineDeviceDefinition,
  buffer: GuestBufferPlacement | undefined,
  ram: GuestRam,
): MachineDevice {
  const dma = new CountingDmaSpace();
  const common = {
    name: def.name,
    dma: new DmaPort(dma),
    ...(def.seed === undefined ? {} : { seed: def.seed }),
    ...(def.migrationFlags === undefined ? {} : { migrationFlags: def.migrationFlags }),
  };
  let device: SampleDevice & { driver: StateDriver };
  let guestTx: NicGuestTxDriver | undefined;
  switch (def.type) {
    case 'nic': {
      const ring = def.rxRing ?? DEFAULT_NIC_RING;
      const txRing = {
        iova: buffer!.gpa + BigInt(ring.entries * ring.bufferBytes),
        entries: ring.entries,
        bufferBytes: ring.bufferBytes,
      };
      device = createNicDevice({
        ...common,
        ...(def.flowTableBytes === undefined ? {} : { flowTableBytes: def.flowTableBytes }),
        rxRing: { iova: buffer!.gpa, entries: ring.entries, bufferBytes: ring.bufferBytes },
        txRing,
      });
      guestTx = new NicGuestTxDriver(ram, txRing, def.seed === undefined ? {} : { seed: def.seed });
      break;
    }
    case 'accel':
      device = createAccelDevice({
        ...common,
        ...(def.memoryBytes === undefined ? {} : { memoryBytes: def.memoryBytes }),
        guestBuffer: { iova: buffer!.gpa, bytes: buffer!.bytes },
      });
      break;
    case 'basic':
      device = createBasicDevice({
        ...common,
        ...(def.registerBytes === undefined ? {} : { registerBytes: def.registerBytes }),
      });
      break;
  }
  return {
    name: def.name,
    type: def.type,
    device,
    dma,
    buffer,
    workUnitsPerTick: def.workUnitsPerTick ?? 1,
    guestTx,
  };
}

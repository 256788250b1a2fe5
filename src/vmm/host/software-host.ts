import { totalmem } from 'node:os';
import { Host, type HostOptions } from '../../kernel/host/host.js';
import { invalidArgument, VfioError } from '../../uapi/error.js';
import { Machine, type MachineState, type MachineStatus } from '../machine/machine.js';
import type { MachineDefinition } from '../machine/machine-definition.js';
import { IncomingMigration } from '../migration/destination.js';
import type { MigrationEvent, MigrationInfo } from '../migration/migration-info.js';
import { isFinalStatus } from '../migration/migration-info.js';
import type { IncomingParameters, MigrationParameters } from '../migration/migration-params.js';
import { formatMigrationUri } from '../migration/migration-uri.js';
import { OutgoingMigration } from '../migration/source.js';
import { HostErrorCode, hostError } from './host-errors.js';
import { type HostLogger, silentLogger } from './logger.js';
import { SAFE_NAME, SAFE_NAME_TEXT, parseVmDefinition, vmFootprintBytes } from './vm-definition.js';

export interface SoftwareHostOptions {
  /** The host's name ({@link SAFE_NAME}); it names the control socket. */
  name: string;
  /** Kernel model options (module parameters such as `vfio_iommu_type1.dma_entry_limit`). */
  kernel?: HostOptions;
  /** Most VMs at once; default 64. */
  maxVms?: number;
  /**
   * Most memory the VMs may take together (guest RAM and device state, {@link vmFootprintBytes});
   * default the machine's physical memory.
   */
  maxMemoryBytes?: number;
  logger?: HostLogger;
}

/** What the host says about one VM: the machine's status and how the VMM process was set up. */
export interface VmInfo extends MachineStatus {
  /** The VMM process on the host kernel model (gone once destroyed). */
  pid: number;
  uid: number;
  memlockLimitBytes: bigint;
  /** Memory the VM counts against the host's budget. */
  footprintBytes: number;
  createdAt: string;
}

/** One line of `GET /vms`. */
export interface VmSummary {
  name: string;
  state: MachineState;
  iommu: MachineStatus['iommu'];
  accounting: MachineStatus['accounting'];
  ramBytes: number;
  vcpus: number;
  devices: string[];
  error: MachineStatus['error'];
}

export interface VmDigest {
  name: string;
  state: MachineState;
  /** SHA-256 over guest RAM and every device's state (Machine.digest). */
  digest: string;
  /** Guest RAM bytes written so far, for telling two digests apart. */
  bytesDirtied: number;
}

export interface HostInfo {
  name: string;
  /** The OS process of this host. */
  pid: number;
  startedAt: string;
  uptimeMs: number;
  vms: number;
  shuttingDown: boolean;
  limits: { maxVms: number; maxMemoryBytes: number };
  memory: { usedBytes: number };
  kernel: { dmaEntryLimit: number };
}

export interface ShutdownReport {
  /** VMs stopped and destroyed. */
  destroyed: string[];
  /** What went wrong on the way (every VM is still tried). */
  errors: VfioError[];
}

interface Entry {
  readonly machine: Machine;
  readonly footprintBytes: number;
  readonly createdAt: Date;
  /** Operations on the VM run one after the other, their state checks included. */
  queue: Promise<unknown>;
  destroying: boolean;
  /** The VM's current or last migration (as source or destination). */
  migration: OutgoingMigration | IncomingMigration | undefined;
}

/** What `POST /vms/:name/incoming` takes. */
export interface IncomingRequest {
  /** `tcp:HOST:PORT` to listen on; default `tcp:127.0.0.1:0`. */
  uri?: string;
  params?: Partial<IncomingParameters>;
  /** Run the VM once handed off (default true); false leaves it stopped (QEMU's -S). */
  autostart?: boolean;
  /** Touch guest RAM before listening (QEMU's prealloc=on); default false. */
  prealloc?: boolean;
}

/** What `POST /vms/:name/migrate` takes. */
export interface MigrateRequest {
  /** The destination's `tcp:HOST:PORT`. */
  uri: string;
  params?: Partial<MigrationParameters>;
}

export interface IncomingAnswer {
  /** Where the destination listens, as `migrate` takes it. */
  uri: string;
  address: { host: string; port: number };
  info: MigrationInfo;
}

/**
 * A software host: the host kernel model and the VMs running on it, by name. What a host process
 * holds; the control server drives it over a socket. Each VM's operations are serialized (a start
 * and a stop sent together run in order, each checking the state the other left); operations on
 * different VMs run independently.
 */
export class SoftwareHost {
  readonly name: string;
  /** The host kernel model (processes, users, cgroups, module parameters). */
  readonly kernel: Host;
  readonly maxVms: number;
  readonly maxMemoryBytes: number;
  readonly #logger: HostLogger;
  readonly #vms = new Map<string, Entry>();
  readonly #startedAt = new Date();
  #shutdown: Promise<ShutdownReport> | undefined;

  constructor(options: SoftwareHostOptions) {
    if (typeof options.name !== 'string' || !SAFE_NAME.test(options.name)) {
      throw invalidArgument(`host name ${JSON.stringify(options.name)}: ${SAFE_NAME_TEXT}`);
    }
    this.name = options.name;
    this.kernel = new Host(options.kernel);
    this.maxVms = options.maxVms ?? 64;
    this.maxMemoryBytes = options.maxMemoryBytes ?? totalmem();
    this.#logger = options.logger ?? silentLogger;
  }

  get shuttingDown(): boolean {
    return this.#shutdown !== undefined;
  }

  /** Memory the VMs take from the budget now. */
  get usedMemoryBytes(): number {
    let n = 0;
    for (const e of this.#vms.values()) n += e.footprintBytes;
    return n;
  }

  /** The machine behind a VM (for tests and in-process tools). */
  machine(name: string): Machine {
    return this.#entry(name).machine;
  }

  /**
   * Validate a definition read from JSON (VmDefinitionError lists every violation) and create
   * the VM.
   */
  createFromJson(input: unknown): VmInfo {
    return this.create(parseVmDefinition(input));
  }

  /** Create a VM (nothing runs yet): ERR_VM_EXISTS, ERR_HOST_LIMIT, or the machine's refusal. */
  create(definition: MachineDefinition): VmInfo {
    if (this.shuttingDown) throw hostError(HostErrorCode.SHUTTING_DOWN, `host ${this.name} is shutting down`);
    const name = definition.name;
    if (typeof name !== 'string' || !SAFE_NAME.test(name)) {
      throw hostError(HostErrorCode.BAD_REQUEST, `VM name ${JSON.stringify(name)}: ${SAFE_NAME_TEXT}`);
    }
    if (this.#vms.has(name)) throw hostError(HostErrorCode.VM_EXISTS, `a VM named ${name} exists already`);
    if (this.#vms.size >= this.maxVms) {
      throw hostError(HostErrorCode.HOST_LIMIT, `host ${this.name} runs ${this.#vms.size} VMs, its limit`);
    }
    const footprintBytes = vmFootprintBytes(definition);
    const used = this.usedMemoryBytes;
    if (used + footprintBytes > this.maxMemoryBytes) {
      throw hostError(
        HostErrorCode.HOST_LIMIT,
        `VM ${name} needs ${footprintBytes} bytes of memory; host ${this.name} has ${this.maxMemoryBytes - used} ` +
          `of its ${this.maxMemoryBytes} left`,
      );
    }
    const machine = Machine.create(this.kernel, definition);
    const entry: Entry = {
      machine,
      footprintBytes,
      createdAt: new Date(),
      queue: Promise.resolve(),
      destroying: false,
      migration: undefined,
    };
    this.#vms.set(name, entry);
    machine.onStateChange((state, error) => {
      if (state === 'failed' && error !== undefined) {
        this.#logger.error(`VM ${name} failed: ${error.message}`, { vm: name, code: error.code });
      } else {
        this.#logger.info(`VM ${name} ${state}`, { vm: name, state });
      }
    });
    this.#logger.info(`VM ${name} created`, { vm: name, ramBytes: machine.ram.totalBytes });
    return this.#info(entry);
  }

  /**
   * Start a created VM or resume a stopped one. A VM the kernel refuses (DmaMappingLimitError,
   * GuestRamPinError, …) rejects with that error and is left 'failed'; ERR_VM_STATE otherwise.
   */
  start(name: string): Promise<VmInfo> {
    return this.#op(name, async (entry) => {
      this.#notMigrating(entry, 'start');
      const state = entry.machine.state;
      if (state === 'incoming' && entry.migration?.status === 'failed') {
        // The hand-off never came but the state is loaded: the operator decides to run it here.
        await entry.machine.finishIncoming({ autostart: true });
        return this.#info(entry);
      }
      if (state !== 'created' && state !== 'stopped') throw wrongState(name, state, 'start');
      await entry.machine.start();
      return this.#info(entry);
    });
  }

  /** Pause a running VM (vCPUs and device work); a stopped VM stays stopped. */
  stop(name: string): Promise<VmInfo> {
    return this.#op(name, async (entry) => {
      const state = entry.machine.state;
      if (state === 'stopped') return this.#info(entry);
      this.#notMigrating(entry, 'stop');
      if (state !== 'running') throw wrongState(name, state, 'stop');
      await entry.machine.stop();
      return this.#info(entry);
    });
  }

  /** Tear the VM down and forget it; its name is free again. */
  destroy(name: string): Promise<void> {
    let entry: Entry;
    try {
      entry = this.#entry(name);
    } catch (err) {
      return Promise.reject(err);
    }
    entry.destroying = true;
    const run = entry.queue.then(() => this.#destroy(name, entry));
    entry.queue = run.catch(() => undefined);
    return run;
  }

  /**
   * Make a created VM the destination of a migration: it comes up 'incoming' and listens. Resolves
   * once it listens, with the address to give the source; the migration goes on in the background.
   */
  incoming(name: string, request: IncomingRequest = {}): Promise<IncomingAnswer> {
    return this.#op(name, async (entry) => {
      this.#notMigrating(entry, 'take a migration into');
      const state = entry.machine.state;
      if (state !== 'created') throw wrongState(name, state, 'take a migration into');
      const incoming = await IncomingMigration.listen(entry.machine, {
        ...(request.uri === undefined ? {} : { uri: request.uri }),
        ...(request.params === undefined ? {} : { params: request.params }),
        ...(request.autostart === undefined ? {} : { autostart: request.autostart }),
        ...(request.prealloc === undefined ? {} : { prealloc: request.prealloc }),
      });
      this.#track(name, entry, incoming);
      return { uri: formatMigrationUri(incoming.address), address: incoming.address, info: incoming.query() };
    });
  }

  /** Start migrating a running VM to `request.uri`; resolves at once with the 'setup' status. */
  migrate(name: string, request: MigrateRequest): Promise<MigrationInfo> {
    return this.#op(name, (entry) => {
      this.#notMigrating(entry, 'migrate');
      const state = entry.machine.state;
      if (state !== 'running') throw wrongState(name, state, 'migrate');
      const migration = OutgoingMigration.start(entry.machine, {
        uri: request.uri,
        ...(request.params === undefined ? {} : { params: request.params }),
      });
      this.#track(name, entry, migration);
      return Promise.resolve(migration.query());
    });
  }

  /** query-migrate: the VM's current or last migration. */
  queryMigration(name: string): MigrationInfo {
    return this.#migration(name).query();
  }

  /** migrate_cancel (before the hand-off); answers with the status now ('cancelling', or final). */
  cancelMigration(name: string): MigrationInfo {
    const migration = this.#migration(name);
    migration.cancel();
    return migration.query();
  }

  /**
   * Hear the VM's migration events; `listener` gets the final 'end' event and is then dropped (at
   * once, if the migration has ended already). Returns the function that stops listening.
   */
  watchMigration(name: string, listener: (event: MigrationEvent) => void): () => void {
    const migration = this.#migration(name);
    if (isFinalStatus(migration.status)) {
      listener({ type: 'end', info: migration.query() });
      return () => undefined;
    }
    const stop = migration.onEvent((event) => {
      listener(event);
      if (event.type === 'end') stop();
    });
    return stop;
  }

  status(name: string): VmInfo {
    return this.#info(this.#entry(name));
  }

  digest(name: string): VmDigest {
    const { machine } = this.#entry(name);
    return {
      name,
      state: machine.state,
      digest: machine.digest(),
      bytesDirtied: machine.status().bytesDirtied.total,
    };
  }

  list(): VmSummary[] {
    return [...this.#vms.values()].map(({ machine }) => {
      const s = machine.status();
      return {
        name: s.name,
        state: s.state,
        iommu: s.iommu,
        accounting: s.accounting,
        ramBytes: s.ram.totalBytes,
        vcpus: s.vcpus.count,
        devices: s.devices.map((d) => `${d.name}:${d.type}`),
        error: s.error,
      };
    });
  }

  info(): HostInfo {
    return {
      name: this.name,
      pid: process.pid,
      startedAt: this.#startedAt.toISOString(),
      uptimeMs: Date.now() - this.#startedAt.getTime(),
      vms: this.#vms.size,
      shuttingDown: this.shuttingDown,
      limits: { maxVms: this.maxVms, maxMemoryBytes: this.maxMemoryBytes },
      memory: { usedBytes: this.usedMemoryBytes },
      kernel: { dmaEntryLimit: this.kernel.modules.vfioIommuType1.dmaEntryLimit },
    };
  }

  /**
   * Stop and destroy every VM (each is tried, whatever the others do); no VM can be created
   * afterwards. Calling it again returns the same report.
   */
  shutdown(): Promise<ShutdownReport> {
    this.#shutdown ??= (async () => {
      const report: ShutdownReport = { destroyed: [], errors: [] };
      this.#logger.info(`host ${this.name} shutting down: ${this.#vms.size} VM(s)`);
      await Promise.all(
        [...this.#vms.keys()].map(async (name) => {
          try {
            const entry = this.#vms.get(name);
            if (entry === undefined || entry.destroying) return;
            await this.stop(name).catch(() => undefined);
            await this.destroy(name);
            report.destroyed.push(name);
          } catch (err) {
            report.errors.push(asVfioError(err));
          }
        }),
      );
      report.destroyed.sort();
      return report;
    })();
    return this.#shutdown;
  }

  // ---- internals ------------------------------------------------------------------------------

  #entry(name: string): Entry {
    const entry = typeof name === 'string' ? this.#vms.get(name) : undefined;
    if (entry === undefined)
      throw hostError(HostErrorCode.VM_NOT_FOUND, `no VM named ${name} on host ${this.name}`);
    return entry;
  }

  #op<T>(name: string, op: (entry: Entry) => Promise<T>): Promise<T> {
    let entry: Entry;
    try {
      entry = this.#entry(name);
    } catch (err) {
      return Promise.reject(err);
    }
    if (entry.destroying) return Promise.reject(wrongState(name, 'being destroyed', 'use'));
    const run = entry.queue.then(() => {
      if (entry.destroying) throw wrongState(name, 'being destroyed', 'use');
      return op(entry);
    });
    entry.queue = run.catch(() => undefined);
    return run;
  }

  async #destroy(name: string, entry: Entry): Promise<void> {
    const migration = entry.migration;
    if (migration !== undefined && !isFinalStatus(migration.status)) {
      migration.cancel();
      await migration.done;
    }
    try {
      await entry.machine.destroy();
    } finally {
      if (this.#vms.get(name) === entry) this.#vms.delete(name);
    }
  }

  #migration(name: string): OutgoingMigration | IncomingMigration {
    const migration = this.#entry(name).migration;
    if (migration === undefined) {
      throw hostError(HostErrorCode.NO_MIGRATION, `VM ${name} has not migrated on host ${this.name}`);
    }
    return migration;
  }

  #notMigrating(entry: Entry, op: string): void {
    const migration = entry.migration;
    if (migration !== undefined && !isFinalStatus(migration.status)) {
      throw wrongState(entry.machine.name, `migrating (${migration.status})`, op);
    }
  }

  #track(name: string, entry: Entry, migration: OutgoingMigration | IncomingMigration): void {
    entry.migration = migration;
    const role = migration instanceof OutgoingMigration ? 'outgoing' : 'incoming';
    migration.onEvent((event) => {
      if (event.type === 'status')
        this.#logger.info(`VM ${name}: ${role} migration ${event.status}`, { vm: name });
      if (event.type === 'end' && event.info.error !== undefined) {
        this.#logger.error(
          `VM ${name}: ${role} migration ${event.info.status}: ${event.info.error.message}`,
          {
            vm: name,
            code: event.info.error.code,
          },
        );
      }
    });
  }

  #info(entry: Entry): VmInfo {
    const { machine } = entry;
    return {
      ...machine.status(),
      pid: machine.process.pid,
      uid: machine.definition.uid,
      memlockLimitBytes: machine.definition.memlockLimitBytes,
      footprintBytes: entry.footprintBytes,
      createdAt: entry.createdAt.toISOString(),
    };
  }
}

function wrongState(name: string, state: string, op: string): VfioError {
  const hint = state === 'failed' ? ' (destroy it and create it again)' : '';
  return hostError(HostErrorCode.VM_STATE, `VM ${name} is ${state}, cannot ${op} it${hint}`);
}

function asVfioError(err: unknown): VfioError {
  return err instanceof VfioError ? err : new VfioError('ERR_INTERNAL', String(err), { cause: err });
}

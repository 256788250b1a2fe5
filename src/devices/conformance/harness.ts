import type { ResumeStream, SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import { VfioError } from '../../uapi/error.js';
import { migFeatureNames, MigState, migStateName } from '../../uapi/migration.js';
import type { SampleDevice, SampleDeviceFactory, SampleDeviceOptions } from '../sample-device.js';
import { concatBytes, describeFd, fdKind, readToEnd, type StreamLimits, writeAll } from './data-fds.js';
import { attempt, describeOutcome, expect, isVerdict, VIOLATION_CODE, violation } from './outcome.js';
import { referenceRouteFromRunning } from './reference-fsm.js';

/** A complete STOP_COPY stream of one device and the digest of the state it carries. */
export interface SavedStream {
  readonly bytes: Uint8Array;
  readonly digest: string;
  readonly deviceType: string;
}

/** Options for each device the kit creates: fixed, or made per instance (e.g. a DMA port each). */
export type DeviceOptionsSource =
  SampleDeviceOptions | ((instance: { readonly name: string; readonly seed: number }) => SampleDeviceOptions);

/** The options of one new instance: the caller's, with the kit's name and seed. */
export function instanceOptions(
  source: DeviceOptionsSource,
  name: string,
  seed: number,
): SampleDeviceOptions {
  const base = typeof source === 'function' ? source({ name, seed }) : source;
  return { ...base, name, seed };
}

export interface HarnessSettings extends StreamLimits {
  readonly seed: number;
  readonly workUnits: number;
  readonly deviceOptions: DeviceOptionsSource;
}

/**
 * What every check works with: fresh devices from the factory (each with its own seed, all closed
 * after the check), the device's migration flags, and a cached valid stream ("golden") saved once.
 */
export class Harness {
  readonly factory: SampleDeviceFactory;
  readonly foreign: SampleDeviceFactory | undefined;
  readonly features: number;
  readonly settings: HarnessSettings;
  #serial = 0;
  #open: SampleDevice[] = [];
  #shared: SampleDevice[] = [];
  #golden: SavedStream | VfioError | undefined;
  #foreignStream: SavedStream | VfioError | undefined;

  constructor(options: {
    factory: SampleDeviceFactory;
    foreign: SampleDeviceFactory | undefined;
    features: number;
    settings: HarnessSettings;
  }) {
    this.factory = options.factory;
    this.foreign = options.foreign;
    this.features = options.features;
    this.settings = options.settings;
  }

  get featureNames(): string {
    return migFeatureNames(this.features);
  }

  /** A fresh device of the factory under test; a factory that throws is a violation. */
  create(role: string): SampleDevice {
    return this.#createFrom(this.factory, role);
  }

  /** A device that outlives its check (checks that share one device, in order); closed by dispose(). */
  createShared(role: string): SampleDevice {
    const device = this.#createFrom(this.factory, role);
    this.#shared.push(this.#open.pop()!);
    return device;
  }

  #createFrom(factory: SampleDeviceFactory, role: string): SampleDevice {
    const serial = ++this.#serial;
    const name = `${factory.type}-${role.replaceAll(' ', '-')}-${serial}`;
    const seed = (this.settings.seed * 1000003 + serial * 7919) >>> 0;
    const created = attempt(() => factory.create(instanceOptions(this.settings.deviceOptions, name, seed)));
    if (!created.ok) violation(`${factory.type}.create() failed: ${describeOutcome(created)}`);
    const device = created.value;
    expect(
      device && typeof device === 'object' && device.vfio && typeof device.digest === 'function',
      `${factory.type}.create() returned no sample device`,
    );
    this.#open.push(device);
    return device;
  }

  /** Close every device created since the last cleanup (errors ignored: the check is over). */
  cleanup(): void {
    closeAll(this.#open.splice(0));
  }

  /** Close everything, shared devices included: the run is over. */
  dispose(): void {
    this.cleanup();
    closeAll(this.#shared.splice(0));
  }

  // --- one ioctl each, failures as violations -----------------------------------------------

  getState(device: SampleDevice, why = 'MIG_DEVICE_STATE GET'): number {
    const got = attempt(() => device.vfio.getMigDeviceState());
    if (!got.ok) violation(`${why}: ${describeOutcome(got)}`);
    return got.value;
  }

  /** SET that must succeed and return an fd of `fd` kind; returns the fd (or -1). */
  set(
    device: SampleDevice,
    target: number,
    fd: 'none' | 'save' | 'resume',
    why: string,
  ): SavingStream | ResumeStream | -1 {
    const before = this.getState(device, why);
    const got = attempt(() => device.vfio.setMigDeviceState(target));
    const arc = `${migStateName(before)} -> ${migStateName(target)}`;
    if (!got.ok) violation(`${why}: SET ${arc} failed: ${describeOutcome(got)}`);
    expect(
      fdKind(got.value) === fd,
      () => `${why}: SET ${arc} returned ${describeFd(got.value)}, expected ${fd}`,
    );
    const after = this.getState(device, why);
    expect(after === target, () => `${why}: SET ${arc} succeeded but GET says ${migStateName(after)}`);
    return got.value;
  }

  setSaving(device: SampleDevice, target: number, why: string): SavingStream {
    return this.set(device, target, 'save', why) as SavingStream;
  }

  setResuming(device: SampleDevice, why: string): ResumeStream {
    return this.set(device, MigState.RESUMING, 'resume', why) as ResumeStream;
  }

  digest(device: SampleDevice, why: string): string {
    const got = attempt(() => device.digest());
    if (!got.ok) violation(`${why}: digest() failed: ${describeOutcome(got)}`);
    expect(typeof got.value === 'string' && got.value.length > 0, `${why}: digest() returned no string`);
    return got.value;
  }

  work(device: SampleDevice, units = this.settings.workUnits, why = 'work()'): void {
    const got = attempt(() => device.work(units));
    if (!got.ok) violation(`${why}: work(${units}) failed: ${describeOutcome(got)}`);
  }

  /**
   * Bring a fresh device (RUNNING) to `state` one direct arc at a time along the reference path.
   * Returns the data fd of the session open in `state`, if any. RESUMING gets the golden stream
   * written in full, so that leaving it is a valid load.
   */
  driveTo(device: SampleDevice, state: number): SavingStream | ResumeStream | undefined {
    const route = referenceRouteFromRunning(state, this.features);
    expect(route, `setup: no route to ${migStateName(state)} for ${this.featureNames}`);
    let fd: SavingStream | ResumeStream | undefined;
    for (const arc of route) {
      const expected = arc.effect === 'new-save' ? 'save' : arc.effect === 'new-resume' ? 'resume' : 'none';
      const got = this.set(device, arc.to, expected, `setup (towards ${migStateName(state)})`);
      if (got !== -1) fd = got;
    }
    if (state === MigState.RESUMING) writeAll(fd as ResumeStream, this.golden().bytes, 'golden stream');
    return fd;
  }

  /** Save a device from RUNNING: work, STOP, STOP_COPY, read all; back to STOP. */
  save(device: SampleDevice, why: string): SavedStream {
    this.work(device, this.settings.workUnits, why);
    this.driveFromRunningTo(device, MigState.STOP, why);
    const fd = this.setSaving(device, MigState.STOP_COPY, why);
    const bytes = concatBytes(readToEnd(fd, this.settings));
    const digest = this.digest(device, why);
    this.set(device, MigState.STOP, 'none', why);
    return { bytes, digest, deviceType: this.factory.type };
  }

  /** Single arcs from RUNNING to a non-session state (STOP, RUNNING_P2P). */
  driveFromRunningTo(device: SampleDevice, state: number, why: string): void {
    const route = referenceRouteFromRunning(state, this.features) ?? [];
    for (const arc of route) this.set(device, arc.to, 'none', why);
  }

  /** A fresh device loaded with `stream` (STOP -> RESUMING, write, -> STOP), left in STOP. */
  load(stream: Uint8Array, why: string): SampleDevice {
    const device = this.create('destination');
    this.work(device, this.settings.workUnits * 2 + 1, why);
    this.driveFromRunningTo(device, MigState.STOP, why);
    const fd = this.setResuming(device, why);
    writeAll(fd, stream);
    this.set(device, MigState.STOP, 'none', `${why}: load`);
    return device;
  }

  /** A valid stream of the device under test, saved once per run. */
  golden(): SavedStream {
    if (this.#golden === undefined) this.#golden = this.#capture(this.factory, 'golden source');
    if (this.#golden instanceof Error) throw this.#golden;
    return this.#golden;
  }

  /** A valid stream of the foreign factory's device (undefined without a foreign factory). */
  foreignStream(): SavedStream | undefined {
    const foreign = this.foreign;
    if (!foreign) return undefined;
    if (this.#foreignStream === undefined) this.#foreignStream = this.#capture(foreign, 'foreign source');
    if (this.#foreignStream instanceof Error) throw this.#foreignStream;
    return this.#foreignStream;
  }

  #capture(factory: SampleDeviceFactory, role: string): SavedStream | VfioError {
    try {
      const source = this.#createFrom(factory, role);
      // The foreign device may have other features: walk it with plain requests, not our route.
      this.work(source, this.settings.workUnits, role);
      const stop = attempt(() => source.vfio.setMigDeviceState(MigState.STOP));
      if (!stop.ok) violation(`${role}: SET STOP failed: ${describeOutcome(stop)}`);
      const fd = attempt(() => source.vfio.setMigDeviceState(MigState.STOP_COPY));
      if (!fd.ok) violation(`${role}: SET STOP_COPY failed: ${describeOutcome(fd)}`);
      expect(fdKind(fd.value) === 'save', `${role}: STOP -> STOP_COPY returned ${describeFd(fd.value)}`);
      const bytes = concatBytes(readToEnd(fd.value as SavingStream, this.settings, [], true));
      const digest = this.digest(source, role);
      return { bytes, digest, deviceType: factory.type };
    } catch (error) {
      if (isVerdict(error, VIOLATION_CODE)) {
        return new VfioError(VIOLATION_CODE, `capturing a ${role} stream: ${error.message}`);
      }
      throw error;
    }
  }
}

function closeAll(devices: readonly SampleDevice[]): void {
  for (const device of devices) {
    try {
      device.vfio.close();
    } catch {
      // a device that cannot close is not this check's concern
    }
  }
}

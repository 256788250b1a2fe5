import fc from 'fast-check';
import type { ResumeStream, SavingStream } from '../../kernel/vfio/mig-data-stream.js';
import { MIG_STATE_COUNT, MigState, migStateName } from '../../uapi/migration.js';
import type { SampleDevice } from '../sample-device.js';
import { type CheckSpec, check } from './check.js';
import { describeFd, fdKind } from './data-fds.js';
import type { Harness, SavedStream } from './harness.js';
import {
  attempt,
  describeOutcome,
  errorMessage,
  expect,
  isVerdict,
  VIOLATION_CODE,
  violation,
} from './outcome.js';
import { referenceSetState, referenceStates } from './reference-fsm.js';

/**
 * Random sequences of set-state / reset / read / write / close / work / precopy-info on one device,
 * each step checked against the kit's reference model. The model knows the state, every data fd
 * the sequence got (live, dead, closed, or unknown after a failure the uAPI leaves open) and, for
 * a resume session, how much of a valid stream was written, so it knows when a load must succeed,
 * must fail, or may do either (and then must not load a wrong state).
 */

type Liveness = 'live' | 'dead' | 'unknown';

interface ModelFd {
  readonly kind: 'save' | 'resume';
  live: Liveness;
  closed: boolean;
  /** A STOP_COPY read returned 0: every later read must too. */
  eof: boolean;
}

interface ResumeProgress {
  /** Bytes of the valid stream written, in order. */
  validBytes: number;
  /** Anything else reached the session (garbage, a write whose fate is unknown, a failed load). */
  odd: boolean;
}

interface Model {
  readonly features: number;
  readonly golden: SavedStream;
  state: number;
  readonly fds: ModelFd[];
  resume: ResumeProgress | undefined;
}

interface Real {
  readonly kit: Harness;
  readonly device: SampleDevice;
  readonly fds: (SavingStream | ResumeStream)[];
}

type Cmd = fc.Command<Model, Real>;

const STOPPED = new Set<number>([MigState.STOP, MigState.STOP_COPY, MigState.RESUMING, MigState.ERROR]);
const isPrecopy = (s: number) => s === MigState.PRE_COPY || s === MigState.PRE_COPY_P2P;

/** After every command: GET agrees with the model. */
function expectState(m: Model, r: Real, after: string): void {
  const state = r.kit.getState(r.device, `GET after ${after}`);
  expect(
    state === m.state,
    `after ${after}: GET says ${migStateName(state)}, the model says ${migStateName(m.state)}`,
  );
}

function endAllSessions(m: Model): void {
  for (const fd of m.fds) fd.live = 'dead';
  m.resume = undefined;
}

class SetStateCmd implements Cmd {
  constructor(readonly target: number) {}
  check = () => true;
  run(m: Model, r: Real): void {
    const from = m.state;
    const arc = `SET ${migStateName(from)} -> ${migStateName(this.target)}`;
    const expected = referenceSetState(from, this.target, m.features);
    const got = attempt(() => r.device.vfio.setMigDeviceState(this.target));
    const observed = r.kit.getState(r.device, `GET after ${arc}`);
    if (!expected.ok) {
      expect(
        !got.ok && got.errno === 'EINVAL',
        () =>
          `${arc}: expected EINVAL (${expected.reason}), got ${got.ok ? describeFd(got.value) : describeOutcome(got)}`,
      );
      expect(observed === from, `${arc}: refused, but the device moved to ${migStateName(observed)}`);
      return;
    }
    let load: 'must' | 'never' | 'may' = 'must';
    if (expected.loads) {
      const p = m.resume;
      const complete = p !== undefined && p.validBytes === m.golden.bytes.length;
      load = !complete ? 'never' : p.odd ? 'may' : 'must';
    }
    if (got.ok) {
      expect(
        load !== 'never',
        () =>
          `${arc}: the load succeeded with ${m.resume?.validBytes ?? 0} of ${m.golden.bytes.length} bytes of a valid stream written`,
      );
      const kind = fdKind(got.value);
      expect(
        kind === expected.fd,
        `${arc}: expected ${expected.fd === 'none' ? 'no fd' : `a ${expected.fd} fd`}, got ${describeFd(got.value)}`,
      );
      expect(observed === this.target, `${arc}: succeeded, but GET says ${migStateName(observed)}`);
      if (expected.loads) {
        const digest = r.kit.digest(r.device, `${arc} (after the load)`);
        expect(
          digest === m.golden.digest,
          `${arc}: the load succeeded but the digest differs from the source's`,
        );
      }
      if (expected.session === 'ended') endAllSessions(m);
      if (kind === 'save' || kind === 'resume') {
        m.fds.push({ kind, live: 'live', closed: false, eof: false });
        r.fds.push(got.value as SavingStream | ResumeStream);
        if (kind === 'resume') m.resume = { validBytes: 0, odd: false };
      }
      m.state = this.target;
      return;
    }
    expect(expected.loads, () => `${arc}: a legal transition failed: ${describeOutcome(got)}`);
    expect(
      load !== 'must',
      () => `${arc}: the load of a complete valid stream failed: ${describeOutcome(got)}`,
    );
    expect(got.errno !== undefined, () => `${arc}: failed without an errno: ${describeOutcome(got)}`);
    expect(
      observed === from || observed === MigState.ERROR,
      `${arc}: a failed load left the device in ${migStateName(observed)} (uAPI: the original state or ERROR)`,
    );
    m.state = observed;
    for (const fd of m.fds) if (fd.live === 'live') fd.live = 'unknown';
    if (m.resume) m.resume.odd = true;
  }
  toString = () => `set(${migStateName(this.target)})`;
}

class ResetCmd implements Cmd {
  check = () => true;
  run(m: Model, r: Real): void {
    const got = attempt(() => r.device.vfio.reset());
    expect(got.ok, () => `reset: ${describeOutcome(got)}`);
    m.state = MigState.RUNNING;
    endAllSessions(m);
    expectState(m, r, 'reset');
  }
  toString = () => 'reset()';
}

class WorkCmd implements Cmd {
  constructor(readonly units: number) {}
  check = () => true;
  run(m: Model, r: Real): void {
    const before = STOPPED.has(m.state) ? r.kit.digest(r.device, 'before work()') : undefined;
    const got = attempt(() => r.device.work(this.units));
    expect(got.ok, () => `work(${this.units}) in ${migStateName(m.state)}: ${describeOutcome(got)}`);
    if (before !== undefined) {
      expect(
        r.kit.digest(r.device, 'after work()') === before,
        `work(${this.units}) changed the device in ${migStateName(m.state)}`,
      );
    }
  }
  toString = () => `work(${this.units})`;
}

/** Picks the n-th fd of a kind the model holds. */
function pick(m: Model, kind: 'save' | 'resume', slot: number): number | undefined {
  const indexes = m.fds.flatMap((fd, i) => (fd.kind === kind ? [i] : []));
  return indexes.length ? indexes[slot % indexes.length] : undefined;
}

/** The errno an fd must answer before any data is involved, or undefined when it is live. */
function deadFdErrno(fd: ModelFd): 'EBADF' | 'ENODEV' | 'unknown' | undefined {
  if (fd.closed) return 'EBADF';
  if (fd.live === 'dead') return 'ENODEV';
  if (fd.live === 'unknown') return 'unknown';
  return undefined;
}

class ReadCmd implements Cmd {
  constructor(
    readonly slot: number,
    readonly size: number,
  ) {}
  check = (m: Readonly<Model>) => pick(m as Model, 'save', this.slot) !== undefined;
  run(m: Model, r: Real): void {
    const i = pick(m, 'save', this.slot)!;
    const fd = m.fds[i]!;
    const real = r.fds[i] as SavingStream;
    const what = `read(fd#${i}, ${this.size}) in ${migStateName(m.state)}`;
    const dead = deadFdErrno(fd);
    if (dead === 'unknown') {
      const got = attempt(() => real.read(this.size));
      expect(got.ok || got.errno !== undefined, () => `${what}: ${describeOutcome(got)}`);
      if (!got.ok && got.errno === 'ENODEV') fd.live = 'dead';
      return;
    }
    if (dead) {
      const got = attempt(() => real.read(this.size));
      expect(
        !got.ok && got.errno === dead,
        () =>
          `${what} on a ${dead === 'EBADF' ? 'closed' : 'dead'} fd: expected ${dead}, got ${got.ok ? `${got.value.length} bytes` : describeOutcome(got)}`,
      );
      return;
    }
    if (isPrecopy(m.state)) {
      const info = attempt(() => real.precopyInfo());
      expect(info.ok, () => `precopy info before ${what}: ${describeOutcome(info)}`);
      const empty = info.value.initialBytes === 0n && info.value.dirtyBytes === 0n;
      const got = attempt(() => real.read(this.size));
      if (empty) {
        expect(
          !got.ok && got.errno === 'ENOMSG',
          () =>
            `${what}: precopy info is 0/0, expected ENOMSG, got ${got.ok ? `${got.value.length} bytes` : describeOutcome(got)}`,
        );
      } else {
        expect(
          got.ok,
          () =>
            `${what}: precopy info is initial ${info.value.initialBytes} dirty ${info.value.dirtyBytes}, but read gave ${describeOutcome(got)}`,
        );
        expect(
          got.value.length > 0 && got.value.length <= this.size,
          `${what}: returned ${got.value.length} bytes with data pending`,
        );
      }
      return;
    }
    expect(m.state === MigState.STOP_COPY, `model: a live saving fd in ${migStateName(m.state)}`);
    const got = attempt(() => real.read(this.size));
    expect(
      got.ok,
      () =>
        `${what}: ${describeOutcome(got)}${got.ok ? '' : got.errno === 'ENOMSG' ? ' (STOP_COPY never answers ENOMSG)' : ''}`,
    );
    expect(got.value.length <= this.size, `${what}: returned ${got.value.length} bytes`);
    if (fd.eof)
      expect(got.value.length === 0, `${what}: returned ${got.value.length} bytes after the end of data`);
    if (got.value.length === 0) fd.eof = true;
  }
  toString = () => `read(save#${this.slot}, ${this.size})`;
}

class PrecopyInfoCmd implements Cmd {
  constructor(readonly slot: number) {}
  check = (m: Readonly<Model>) => pick(m as Model, 'save', this.slot) !== undefined;
  run(m: Model, r: Real): void {
    const i = pick(m, 'save', this.slot)!;
    const fd = m.fds[i]!;
    const what = `precopy info (fd#${i}) in ${migStateName(m.state)}`;
    const got = attempt(() => (r.fds[i] as SavingStream).precopyInfo());
    const dead = deadFdErrno(fd);
    if (dead === 'EBADF') {
      expect(
        !got.ok && got.errno === 'EBADF',
        () => `${what} on a closed fd: expected EBADF, got ${describeOutcome(got)}`,
      );
      return;
    }
    const allowed = new Set<string | undefined>();
    if (!isPrecopy(m.state)) allowed.add('EINVAL');
    if (dead === 'ENODEV' || dead === 'unknown') allowed.add('ENODEV');
    if (allowed.size === 0 || dead === 'unknown') allowed.add('ok');
    const answer = got.ok ? 'ok' : got.errno;
    expect(
      allowed.has(answer),
      () =>
        `${what}: expected ${[...allowed].join(' or ')}, got ${got.ok ? 'success' : describeOutcome(got)}`,
    );
  }
  toString = () => `precopyInfo(save#${this.slot})`;
}

class CloseCmd implements Cmd {
  constructor(readonly slot: number) {}
  check = (m: Readonly<Model>) => m.fds.some((fd) => !fd.closed);
  run(m: Model, r: Real): void {
    const open = m.fds.flatMap((fd, i) => (fd.closed ? [] : [i]));
    const i = open[this.slot % open.length]!;
    const got = attempt(() => r.fds[i]!.close());
    expect(got.ok, () => `close(fd#${i}): ${describeOutcome(got)}`);
    m.fds[i]!.closed = true;
    expectState(m, r, `close(fd#${i})`);
  }
  toString = () => `close(open#${this.slot})`;
}

class WriteCmd implements Cmd {
  /** `valid`: the next bytes of the valid stream; else `length` garbage bytes from `seed`. */
  constructor(
    readonly valid: boolean,
    readonly length: number,
    readonly seed: number,
  ) {}
  check = (m: Readonly<Model>) => m.fds.some((fd) => fd.kind === 'resume');
  run(m: Model, r: Real): void {
    // Always the newest resume fd: the one of the current (or last) resuming session.
    const i = m.fds.map((fd) => fd.kind).lastIndexOf('resume');
    const fd = m.fds[i]!;
    const dead = deadFdErrno(fd);
    const progress = dead === undefined || dead === 'unknown' ? m.resume : undefined;
    const from = progress?.validBytes ?? 0;
    const bytes = this.valid
      ? m.golden.bytes.subarray(from, from + this.length)
      : garbage(this.length, this.seed);
    if (bytes.length === 0) return;
    const what = `write(fd#${i}, ${bytes.length} ${this.valid ? 'valid' : 'garbage'} bytes)`;
    const got = attempt(() => (r.fds[i] as ResumeStream).write(bytes));
    if (dead === 'EBADF' || dead === 'ENODEV') {
      expect(
        !got.ok && got.errno === dead,
        () => `${what}: expected ${dead}, got ${got.ok ? 'success' : describeOutcome(got)}`,
      );
      return;
    }
    expect(got.ok || got.errno !== undefined, () => `${what}: ${describeOutcome(got)}`);
    if (!got.ok && got.errno === 'ENODEV' && dead === 'unknown') fd.live = 'dead';
    expect(progress, `model: a usable resume fd without a resuming session`);
    if (!this.valid) {
      progress.odd = true;
      return;
    }
    if (!got.ok) {
      expect(
        progress.odd,
        () => `${what}: writing the valid stream at byte ${from} failed: ${describeOutcome(got)}`,
      );
      return;
    }
    expect(got.value === bytes.length, `${what}: write returned ${got.value}`);
    progress.validBytes += bytes.length;
  }
  toString = () =>
    this.valid ? `writeValid(${this.length})` : `writeGarbage(${this.length}, seed ${this.seed})`;
}

function garbage(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

function commandArbitraries(kit: Harness, streamBytes: number): fc.Arbitrary<Cmd>[] {
  const states = referenceStates(kit.features);
  const target = fc.oneof(
    { arbitrary: fc.constantFrom(...states), weight: 9 },
    { arbitrary: fc.constantFrom(MigState.ERROR, MIG_STATE_COUNT, ...[0, 1, 2, 3, 4, 5, 6, 7]), weight: 1 },
  );
  const setState = target.map((t): Cmd => new SetStateCmd(t));
  return [
    setState,
    setState,
    setState,
    fc.constant(null).map((): Cmd => new ResetCmd()),
    fc.integer({ min: 1, max: 3 * kit.settings.workUnits }).map((u): Cmd => new WorkCmd(u)),
    fc
      .tuple(fc.nat(7), fc.constantFrom(1, 13, 512, 65536, 1 << 20))
      .map(([slot, size]): Cmd => new ReadCmd(slot, size)),
    fc
      .tuple(fc.nat(7), fc.constantFrom(1, 13, 512, 65536, 1 << 20))
      .map(([slot, size]): Cmd => new ReadCmd(slot, size)),
    fc.nat(7).map((slot): Cmd => new PrecopyInfoCmd(slot)),
    fc.nat(7).map((slot): Cmd => new CloseCmd(slot)),
    fc
      .constantFrom(1, 7, Math.max(1, Math.floor(streamBytes / 3)), streamBytes)
      .map((n): Cmd => new WriteCmd(true, n, 0)),
    fc
      .constantFrom(1, 7, Math.max(1, Math.floor(streamBytes / 3)), streamBytes)
      .map((n): Cmd => new WriteCmd(true, n, 0)),
    fc.tuple(fc.integer({ min: 1, max: 64 }), fc.nat()).map(([n, seed]): Cmd => new WriteCmd(false, n, seed)),
  ];
}

export interface ModelSettings {
  readonly runs: number;
  readonly maxCommands: number;
  readonly timeLimitMs: number;
}

export const MODEL_CHECK_NAME = 'random sequences against the reference model';

export function modelChecks(_kit: Harness, settings: ModelSettings): CheckSpec[] {
  if (settings.runs <= 0) return [];
  return [check('model', MODEL_CHECK_NAME, (k) => runModel(k, settings))];
}

function runModel(kit: Harness, settings: ModelSettings): string {
  const golden = kit.golden();
  const arbitraries = commandArbitraries(kit, golden.bytes.length);
  const seed = kit.settings.seed;
  let commandsRun = 0;
  const property = fc.property(
    fc.commands(arbitraries, { maxCommands: settings.maxCommands, size: 'max' }),
    (cmds) => {
      try {
        fc.modelRun(
          () => {
            const device = kit.create('model');
            const model: Model = {
              features: kit.features,
              golden,
              state: MigState.RUNNING,
              fds: [],
              resume: undefined,
            };
            return { model, real: { kit, device, fds: [] } };
          },
          {
            [Symbol.iterator]: function* () {
              for (const cmd of cmds) {
                commandsRun++;
                yield cmd;
              }
            },
          },
        );
      } finally {
        kit.cleanup();
      }
    },
  );
  const details = fc.check(property, {
    numRuns: settings.runs,
    seed,
    plugins: [fc.interruptAfterTimeLimit(settings.timeLimitMs)],
  });
  if (details.failed) {
    const error = details.errorInstance;
    const reason = isVerdict(error, VIOLATION_CODE) ? error.message : errorMessage(error);
    const counterexample = details.counterexample as [Iterable<Cmd>] | null;
    const sequence = counterexample ? String(counterexample[0]) : '(none)';
    violation(
      `${reason}\n  sequence: ${sequence}\n  replay: seed ${details.seed}, path "${details.counterexamplePath}" ` +
        `(after ${details.numRuns} runs, ${details.numShrinks} shrinks)`,
    );
  }
  const note = details.interrupted ? ` (time limit ${settings.timeLimitMs} ms reached)` : '';
  return `${details.numRuns} runs, ${commandsRun} commands, seed ${seed}${note}`;
}

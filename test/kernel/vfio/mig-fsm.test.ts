import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Worker } from 'node:worker_threads';
import { migrationPath, nextMigrationState } from '../../../src/kernel/vfio/mig-fsm.js';
import { VfioError } from '../../../src/uapi/error.js';

// Everything below is written out from spec/kernel-uapi.md 1.1, 1.4 and 1.5, independently of src/.
const ERROR = 0;
const STOP = 1;
const RUN = 2;
const SC = 3;
const RES = 4;
const RP2P = 5;
const PC = 6;
const PCP2P = 7;
const ALL = [ERROR, STOP, RUN, SC, RES, RP2P, PC, PCP2P];
const NAMES = ['ERROR', 'STOP', 'RUN', 'SC', 'RES', 'RP2P', 'PC', 'PCP2P'];
const X = -1; // EINVAL cell

const F_SC = 1;
const F_P2P = 2;
const F_PC = 4;

interface Combo {
  name: string;
  flags: number;
  states: number[];
  /** next[cur][target] for supported cur/target; X = EINVAL; cur==target rows hold cur. */
  next: Record<number, Record<number, number>>;
}

// SC|P2P|PC: the raw kernel table of 1.5.
const FULL: Combo = {
  name: 'SC|P2P|PC',
  flags: F_SC | F_P2P | F_PC,
  states: [STOP, RUN, SC, RES, RP2P, PC, PCP2P],
  next: {
    [STOP]: { [STOP]: STOP, [RUN]: RP2P, [SC]: SC, [RES]: RES, [RP2P]: RP2P, [PC]: RP2P, [PCP2P]: RP2P },
    [RUN]: { [STOP]: RP2P, [RUN]: RUN, [SC]: RP2P, [RES]: RP2P, [RP2P]: RP2P, [PC]: PC, [PCP2P]: RP2P },
    [SC]: { [STOP]: STOP, [RUN]: STOP, [SC]: SC, [RES]: STOP, [RP2P]: STOP, [PC]: X, [PCP2P]: X },
    [RES]: { [STOP]: STOP, [RUN]: STOP, [SC]: STOP, [RES]: RES, [RP2P]: STOP, [PC]: STOP, [PCP2P]: STOP },
    [RP2P]: { [STOP]: STOP, [RUN]: RUN, [SC]: STOP, [RES]: STOP, [RP2P]: RP2P, [PC]: RUN, [PCP2P]: PCP2P },
    [PC]: { [STOP]: RUN, [RUN]: RUN, [SC]: PCP2P, [RES]: RUN, [RP2P]: RUN, [PC]: PC, [PCP2P]: PCP2P },
    [PCP2P]: { [STOP]: RP2P, [RUN]: RP2P, [SC]: SC, [RES]: RP2P, [RP2P]: RP2P, [PC]: PC, [PCP2P]: PCP2P },
  },
};

const SC_ONLY: Combo = {
  name: 'SC',
  flags: F_SC,
  states: [STOP, RUN, SC, RES],
  next: {
    [STOP]: { [STOP]: STOP, [RUN]: RUN, [SC]: SC, [RES]: RES },
    [RUN]: { [STOP]: STOP, [RUN]: RUN, [SC]: STOP, [RES]: STOP },
    [SC]: { [STOP]: STOP, [RUN]: STOP, [SC]: SC, [RES]: STOP },
    [RES]: { [STOP]: STOP, [RUN]: STOP, [SC]: STOP, [RES]: RES },
  },
};

const SC_P2P: Combo = {
  name: 'SC|P2P',
  flags: F_SC | F_P2P,
  states: [STOP, RUN, SC, RES, RP2P],
  next: {
    [STOP]: { [STOP]: STOP, [RUN]: RP2P, [SC]: SC, [RES]: RES, [RP2P]: RP2P },
    [RUN]: { [STOP]: RP2P, [RUN]: RUN, [SC]: RP2P, [RES]: RP2P, [RP2P]: RP2P },
    [SC]: { [STOP]: STOP, [RUN]: STOP, [SC]: SC, [RES]: STOP, [RP2P]: STOP },
    [RES]: { [STOP]: STOP, [RUN]: STOP, [SC]: STOP, [RES]: RES, [RP2P]: STOP },
    [RP2P]: { [STOP]: STOP, [RUN]: RUN, [SC]: STOP, [RES]: STOP, [RP2P]: RP2P },
  },
};

const SC_PC: Combo = {
  name: 'SC|PC',
  flags: F_SC | F_PC,
  states: [STOP, RUN, SC, RES, PC],
  next: {
    [STOP]: { [STOP]: STOP, [RUN]: RUN, [SC]: SC, [RES]: RES, [PC]: RUN },
    [RUN]: { [STOP]: STOP, [RUN]: RUN, [SC]: STOP, [RES]: STOP, [PC]: PC },
    [SC]: { [STOP]: STOP, [RUN]: STOP, [SC]: SC, [RES]: STOP, [PC]: X },
    [RES]: { [STOP]: STOP, [RUN]: STOP, [SC]: STOP, [RES]: RES, [PC]: STOP },
    [PC]: { [STOP]: RUN, [RUN]: RUN, [SC]: SC, [RES]: RUN, [PC]: PC },
  },
};

const COMBOS = [SC_ONLY, SC_P2P, SC_PC, FULL];

/** The direct arcs of 1.4 a device with these flags has. */
function arcs(flags: number): Set<string> {
  const p2p = (flags & F_P2P) !== 0;
  const pc = (flags & F_PC) !== 0;
  const list: [number, number][] = [
    [STOP, SC],
    [SC, STOP],
    [STOP, RES],
    [RES, STOP],
  ];
  if (!p2p) list.push([RUN, STOP], [STOP, RUN]);
  if (p2p) list.push([RUN, RP2P], [RP2P, RUN], [RP2P, STOP], [STOP, RP2P]);
  if (pc) list.push([RUN, PC], [PC, RUN]);
  if (pc && !p2p) list.push([PC, SC]);
  if (pc && p2p) list.push([RP2P, PCP2P], [PCP2P, RP2P], [PC, PCP2P], [PCP2P, PC], [PCP2P, SC]);
  return new Set(list.map(([a, b]) => `${a}>${b}`));
}

const FD_ARCS = new Set([`${RUN}>${PC}`, `${RP2P}>${PCP2P}`, `${STOP}>${SC}`, `${STOP}>${RES}`]);
const SAVING = new Set([PC, PCP2P, SC]);

/**
 * Shortest path length over the 1.4 arcs, with fd arcs last and saving-group states interior only
 * when the path moves inside the group (both ends in it: PC -> PCP2P -> SC).
 */
function constrainedDistance(flags: number, from: number, to: number): number | undefined {
  const graph = arcs(flags);
  const insideGroup = SAVING.has(from) && SAVING.has(to);
  let frontier = [from];
  const seen = new Set([from]);
  for (let d = 1; frontier.length; d++) {
    const nextFrontier: number[] = [];
    for (const s of frontier) {
      if (s !== from && SAVING.has(s) && !insideGroup) continue; // may not pass through
      for (const t of ALL) {
        if (!graph.has(`${s}>${t}`)) continue;
        if (t === to) return d;
        if (FD_ARCS.has(`${s}>${t}`) || seen.has(t)) continue; // an fd arc must be the last one
        seen.add(t);
        nextFrontier.push(t);
      }
    }
    frontier = nextFrontier;
  }
  return undefined;
}

function assertEinval(fn: () => unknown, what: string): void {
  assert.throws(fn, (err: unknown) => err instanceof VfioError && err.errno === 'EINVAL', what);
}

/** The path the test's own table gives, following next[][] (undefined when a cell is EINVAL). */
function tablePath(combo: Combo, from: number, to: number): number[] | undefined {
  const path: number[] = [];
  for (let at = from; at !== to;) {
    const next = combo.next[at]![to]!;
    if (next === X) return undefined;
    path.push(next);
    at = next;
    assert.ok(path.length < 8, 'test table loops');
  }
  return path;
}

describe('nextMigrationState: every cell of the 1.5 tables', () => {
  for (const combo of COMBOS) {
    test(`${combo.name}: supported (current, target) pairs`, () => {
      let cells = 0;
      for (const cur of combo.states) {
        for (const target of combo.states) {
          const want = combo.next[cur]![target]!;
          const label = `${combo.name} ${NAMES[cur]}->${NAMES[target]}`;
          // The EINVAL cells (STOP_COPY -> PRE_COPY*) run in a worker below: unguarded, they never return.
          if (want === X) continue;
          assert.equal(nextMigrationState(cur, target, combo.flags), want, label);
          cells++;
        }
      }
      const einvalCells = combo.states.flatMap((c) => combo.states.filter((t) => combo.next[c]![t] === X));
      assert.equal(cells + einvalCells.length, combo.states.length ** 2);
      assert.equal(einvalCells.length, combo.flags & F_PC ? (combo.flags & F_P2P ? 2 : 1) : 0);
    });

    test(`${combo.name}: ERROR, unsupported and out-of-range states are EINVAL as current and as target`, () => {
      const bad = [...ALL.filter((s) => !combo.states.includes(s)), 8, 9, 255, -1, 1.5, Number.NaN];
      assert.ok(bad.includes(ERROR));
      for (const b of bad) {
        for (const s of [...combo.states, ...bad]) {
          assertEinval(() => nextMigrationState(b, s, combo.flags), `cur ${b} target ${s}`);
          assertEinval(() => nextMigrationState(s, b, combo.flags), `cur ${s} target ${b}`);
          assertEinval(() => migrationPath(b, s, combo.flags), `path ${b}->${s}`);
          assertEinval(() => migrationPath(s, b, combo.flags), `path ${s}->${b}`);
        }
      }
    });
  }

  test('a device without STOP_COPY (flags 0, P2P only, PC only) supports no state at all', () => {
    for (const flags of [0, F_P2P, F_PC, F_P2P | F_PC]) {
      for (const a of ALL)
        for (const b of ALL) assertEinval(() => nextMigrationState(a, b, flags), `${flags}`);
    }
  });
});

describe('migrationPath', () => {
  test('the full paths of 1.5', () => {
    assert.deepEqual(migrationPath(RUN, SC, FULL.flags), [RP2P, STOP, SC]);
    assert.deepEqual(migrationPath(PC, SC, FULL.flags), [PCP2P, SC]);
    assert.deepEqual(migrationPath(RES, PC, FULL.flags), [STOP, RP2P, RUN, PC]);
    assert.deepEqual(migrationPath(PC, RES, FULL.flags), [RUN, RP2P, STOP, RES]);
    // The same requests on the smaller combos skip what the device lacks.
    assert.deepEqual(migrationPath(RUN, SC, SC_P2P.flags), [RP2P, STOP, SC]);
    assert.deepEqual(migrationPath(RUN, SC, SC_ONLY.flags), [STOP, SC]);
    assert.deepEqual(migrationPath(RUN, SC, SC_PC.flags), [STOP, SC]);
    assert.deepEqual(migrationPath(PC, SC, SC_PC.flags), [SC]);
    assert.deepEqual(migrationPath(RES, PC, SC_PC.flags), [STOP, RUN, PC]);
    assert.deepEqual(migrationPath(PC, RES, SC_PC.flags), [RUN, STOP, RES]);
    assert.deepEqual(migrationPath(RES, RUN, SC_P2P.flags), [STOP, RP2P, RUN]);
    assert.deepEqual(migrationPath(SC, RUN, SC_ONLY.flags), [STOP, RUN]);
  });

  test('every pair of every combo follows the table and ends at the target', () => {
    let paths = 0;
    for (const combo of COMBOS) {
      for (const cur of combo.states) {
        for (const target of combo.states) {
          const want = tablePath(combo, cur, target);
          if (want === undefined) continue; // STOP_COPY -> PRE_COPY*: the worker test below
          assert.deepEqual(
            migrationPath(cur, target, combo.flags),
            want,
            `${combo.name} ${NAMES[cur]}->${NAMES[target]}`,
          );
          paths++;
        }
      }
    }
    assert.equal(paths, 112);
  });

  test('STOP_COPY -> PRE_COPY(_P2P) is EINVAL and returns (the ERROR guard: no endless skip loop)', async () => {
    // Run in a worker, so a regression to the unguarded kernel loop fails instead of hanging the suite.
    const moduleUrl = new URL('../../../src/kernel/vfio/mig-fsm.js', import.meta.url).href;
    const cases = [
      [SC, PC, SC_PC.flags],
      [SC, PC, FULL.flags],
      [SC, PCP2P, FULL.flags],
    ];
    const worker = new Worker(
      `import(${JSON.stringify(moduleUrl)}).then((m) => {
        const out = [];
        for (const [cur, target, flags] of ${JSON.stringify(cases)}) {
          for (const fn of [m.nextMigrationState, m.migrationPath]) {
            try { fn(cur, target, flags); out.push('ok'); }
            catch (e) { out.push(e.errno); }
          }
        }
        require('node:worker_threads').parentPort.postMessage(out);
      });`,
      { eval: true },
    );
    const result = await new Promise<unknown>((resolve, reject) => {
      const timer = setTimeout(() => {
        void worker.terminate();
        reject(new Error('nextMigrationState(STOP_COPY, PRE_COPY) did not return within 2 s'));
      }, 2000);
      worker.once('message', (m) => {
        clearTimeout(timer);
        void worker.terminate();
        resolve(m);
      });
      worker.once('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
    assert.deepEqual(result, Array(6).fill('EINVAL'));
  });

  test('target == current is the empty path (no-op) for every supported state', () => {
    for (const combo of COMBOS) {
      for (const s of combo.states) {
        assert.deepEqual(migrationPath(s, s, combo.flags), []);
        assert.equal(nextMigrationState(s, s, combo.flags), s);
      }
    }
  });
});

describe('path invariants over all pairs of all combos (1.4)', () => {
  const forEachPath = (fn: (combo: Combo, cur: number, target: number, path: number[]) => void) => {
    let n = 0;
    for (const combo of COMBOS) {
      for (const cur of combo.states) {
        for (const target of combo.states) {
          if (cur === SC && (target === PC || target === PCP2P)) continue; // EINVAL, tested above
          fn(combo, cur, target, migrationPath(cur, target, combo.flags));
          n++;
        }
      }
    }
    // 16 + 25 + 25 - 1 + 49 - 2 pairs with a path
    assert.equal(n, 112);
  };

  test('every step is a direct arc the device has', () => {
    forEachPath((combo, cur, _target, path) => {
      const graph = arcs(combo.flags);
      let at = cur;
      for (const s of path) {
        assert.ok(graph.has(`${at}>${s}`), `${combo.name}: ${NAMES[at]}->${NAMES[s]} is not an arc`);
        at = s;
      }
    });
  });

  test('paths are shortest (under the saving-group and fd-arc rules)', () => {
    forEachPath((combo, cur, target, path) => {
      const want = cur === target ? 0 : constrainedDistance(combo.flags, cur, target);
      assert.equal(path.length, want, `${combo.name} ${NAMES[cur]}->${NAMES[target]}`);
    });
  });

  test('saving-group states are never in the interior of a path that leaves or enters the group', () => {
    let inside = 0;
    forEachPath((combo, cur, target, path) => {
      if (SAVING.has(cur) && SAVING.has(target)) {
        // Moving inside the group stays inside it.
        for (const s of path) assert.ok(SAVING.has(s), `${combo.name} ${NAMES[cur]}->${NAMES[target]}`);
        inside++;
        return;
      }
      for (const s of path.slice(0, -1)) {
        assert.ok(!SAVING.has(s), `${combo.name} ${NAMES[cur]}->${NAMES[target]} passes ${NAMES[s]}`);
      }
    });
    // SC, SC|P2P: SC->SC; SC|PC: SC, PC, PC->SC; full: SC, PC, PCP2P, PC<->PCP2P, PC->SC, PCP2P->SC
    assert.equal(inside, 1 + 1 + 3 + 7);
  });

  test('the four fd-opening arcs occur only as the last step', () => {
    let lastFdArcs = 0;
    forEachPath((combo, cur, target, path) => {
      const steps = [cur, ...path];
      for (let i = 1; i < steps.length; i++) {
        const arc = `${steps[i - 1]}>${steps[i]}`;
        if (FD_ARCS.has(arc)) {
          assert.equal(i, steps.length - 1, `${combo.name} ${NAMES[cur]}->${NAMES[target]}`);
          lastFdArcs++;
        }
      }
      // Moving inside the saving group never opens a new fd.
      if (SAVING.has(cur) && SAVING.has(target)) {
        for (let i = 1; i < steps.length; i++) assert.ok(!FD_ARCS.has(`${steps[i - 1]}>${steps[i]}`));
      }
    });
    assert.ok(lastFdArcs > 0);
  });
});

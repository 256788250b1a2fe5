import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  referenceArcs,
  referenceSetState,
  referenceStates,
} from '../../../src/devices/conformance/reference-fsm.js';
import { migrationPath } from '../../../src/kernel/vfio/mig-fsm.js';
import { VfioError } from '../../../src/uapi/error.js';
import { MIG_FEATURE_COMBOS, MigFeature, MigState, migStateName } from '../../../src/uapi/migration.js';

const { ERROR, STOP, RUNNING: RUN, STOP_COPY: SC, RESUMING: RES } = MigState;
const { RUNNING_P2P: RP2P, PRE_COPY: PC, PRE_COPY_P2P: PCP2P } = MigState;
const { STOP_COPY: F_SC, P2P: F_P2P, PRE_COPY: F_PC } = MigFeature;
const ALL = F_SC | F_P2P | F_PC;

/** The first step the reference takes, 'EINVAL', or '-' for a no-op. */
function nextStep(cur: number, target: number, features: number): string {
  const out = referenceSetState(cur, target, features);
  if (!out.ok) return 'EINVAL';
  return out.arcs.length === 0 ? '-' : migStateName(out.arcs[0]!.to);
}

const names = (states: readonly number[]) => states.map(migStateName);

describe('reference FSM against spec/kernel-uapi.md 1.5', () => {
  test('SC|P2P|PC: every cell of the next-step table', () => {
    // Transcribed from the spec table: rows cur, columns STOP RUN SC RES RP2P PC PCP2P.
    const cols = [STOP, RUN, SC, RES, RP2P, PC, PCP2P];
    const table: Record<number, string[]> = {
      [STOP]: ['-', 'RUNNING_P2P', 'STOP_COPY', 'RESUMING', 'RUNNING_P2P', 'RUNNING_P2P', 'RUNNING_P2P'],
      [RUN]: ['RUNNING_P2P', '-', 'RUNNING_P2P', 'RUNNING_P2P', 'RUNNING_P2P', 'PRE_COPY', 'RUNNING_P2P'],
      [SC]: ['STOP', 'STOP', '-', 'STOP', 'STOP', 'EINVAL', 'EINVAL'],
      [RES]: ['STOP', 'STOP', 'STOP', '-', 'STOP', 'STOP', 'STOP'],
      [RP2P]: ['STOP', 'RUNNING', 'STOP', 'STOP', '-', 'RUNNING', 'PRE_COPY_P2P'],
      [PC]: ['RUNNING', 'RUNNING', 'PRE_COPY_P2P', 'RUNNING', 'RUNNING', '-', 'PRE_COPY_P2P'],
      [PCP2P]: ['RUNNING_P2P', 'RUNNING_P2P', 'STOP_COPY', 'RUNNING_P2P', 'RUNNING_P2P', 'PRE_COPY', '-'],
    };
    for (const cur of cols) {
      const got = cols.map((t) => nextStep(cur, t, ALL));
      assert.deepEqual(got, table[cur], `row ${migStateName(cur)}`);
    }
  });

  test('reduced feature sets: the cells the spec lists', () => {
    const cells: [number, number, number, string][] = [
      // SC only
      [F_SC, STOP, RUN, 'RUNNING'],
      [F_SC, STOP, SC, 'STOP_COPY'],
      [F_SC, STOP, RES, 'RESUMING'],
      [F_SC, RUN, STOP, 'STOP'],
      [F_SC, RUN, SC, 'STOP'],
      [F_SC, RUN, RES, 'STOP'],
      [F_SC, SC, RUN, 'STOP'],
      [F_SC, SC, RES, 'STOP'],
      [F_SC, RES, RUN, 'STOP'],
      [F_SC, RES, SC, 'STOP'],
      // SC|P2P
      [F_SC | F_P2P, STOP, RUN, 'RUNNING_P2P'],
      [F_SC | F_P2P, STOP, RP2P, 'RUNNING_P2P'],
      [F_SC | F_P2P, RUN, STOP, 'RUNNING_P2P'],
      [F_SC | F_P2P, RUN, SC, 'RUNNING_P2P'],
      [F_SC | F_P2P, RUN, RES, 'RUNNING_P2P'],
      [F_SC | F_P2P, RP2P, STOP, 'STOP'],
      [F_SC | F_P2P, RP2P, RUN, 'RUNNING'],
      [F_SC | F_P2P, RP2P, SC, 'STOP'],
      [F_SC | F_P2P, RP2P, RES, 'STOP'],
      [F_SC | F_P2P, SC, RP2P, 'STOP'],
      // SC|PC
      [F_SC | F_PC, STOP, PC, 'RUNNING'],
      [F_SC | F_PC, RUN, STOP, 'STOP'],
      [F_SC | F_PC, RUN, SC, 'STOP'],
      [F_SC | F_PC, RUN, PC, 'PRE_COPY'],
      [F_SC | F_PC, SC, PC, 'EINVAL'],
      [F_SC | F_PC, SC, RUN, 'STOP'],
      [F_SC | F_PC, RES, PC, 'STOP'],
      [F_SC | F_PC, PC, STOP, 'RUNNING'],
      [F_SC | F_PC, PC, RUN, 'RUNNING'],
      [F_SC | F_PC, PC, SC, 'STOP_COPY'],
      [F_SC | F_PC, PC, RES, 'RUNNING'],
    ];
    for (const [features, cur, target, want] of cells) {
      assert.equal(
        nextStep(cur, target, features),
        want,
        `${migStateName(cur)} -> ${migStateName(target)} with flags ${features}`,
      );
    }
  });

  test('full paths, fds and sessions of the spec examples', () => {
    const path = (cur: number, target: number) => {
      const out = referenceSetState(cur, target, ALL);
      assert.ok(out.ok);
      return { states: names([cur, ...out.arcs.map((a) => a.to)]), fd: out.fd, session: out.session };
    };
    assert.deepEqual(path(RUN, SC), {
      states: ['RUNNING', 'RUNNING_P2P', 'STOP', 'STOP_COPY'],
      fd: 'save',
      session: 'none',
    });
    assert.deepEqual(path(PC, SC), {
      states: ['PRE_COPY', 'PRE_COPY_P2P', 'STOP_COPY'],
      fd: 'none',
      session: 'kept',
    });
    assert.deepEqual(path(RES, PC), {
      states: ['RESUMING', 'STOP', 'RUNNING_P2P', 'RUNNING', 'PRE_COPY'],
      fd: 'save',
      session: 'ended',
    });
    assert.deepEqual(path(PC, RES), {
      states: ['PRE_COPY', 'RUNNING', 'RUNNING_P2P', 'STOP', 'RESUMING'],
      fd: 'resume',
      session: 'ended',
    });
    // No-op keeps the session, and returns no fd.
    assert.deepEqual(path(SC, SC), { states: ['STOP_COPY'], fd: 'none', session: 'kept' });
  });

  test('invalid targets, ERROR, and states the device lacks are EINVAL', () => {
    for (const target of [ERROR, 8, 0xffffffff, -1]) {
      assert.equal(nextStep(RUN, target, ALL), 'EINVAL');
    }
    assert.equal(nextStep(ERROR, RUN, ALL), 'EINVAL');
    assert.equal(nextStep(RUN, RP2P, F_SC), 'EINVAL');
    assert.equal(nextStep(RUN, PC, F_SC | F_P2P), 'EINVAL');
    assert.equal(nextStep(RUN, PCP2P, F_SC | F_PC), 'EINVAL');
    assert.deepEqual(referenceStates(F_P2P | F_PC), [], 'no STOP_COPY, no states');
  });

  test('NEW arcs only ever end a path; saving states are interior only inside the group', () => {
    for (const features of MIG_FEATURE_COMBOS) {
      const states = referenceStates(features);
      for (const cur of states) {
        for (const target of states) {
          const out = referenceSetState(cur, target, features);
          if (!out.ok) continue;
          out.arcs.forEach((arc, i) => {
            const last = i === out.arcs.length - 1;
            if (arc.effect === 'new-save' || arc.effect === 'new-resume') assert.ok(last);
            const saving: number[] = [SC, PC, PCP2P];
            const inGroup = saving.includes(cur) && saving.includes(target);
            if (!last && !inGroup) assert.ok(![...saving, RES].includes(arc.to));
          });
        }
      }
    }
    // 1.4: RUN<->RP2P, RP2P<->STOP, STOP<->SC, STOP<->RES, RUN<->PC, RP2P<->PCP2P, PC<->PCP2P, PCP2P->SC.
    assert.equal(referenceArcs(ALL).length, 15);
    assert.equal(referenceArcs(F_SC).length, 6);
  });
});

describe('reference FSM agrees with the VFIO core (src/kernel/vfio/mig-fsm.ts)', () => {
  test('same path or the same EINVAL for every pair, every feature combination', () => {
    const targets = [ERROR, STOP, RUN, SC, RES, RP2P, PC, PCP2P, 8];
    const disagreements: string[] = [];
    for (const features of MIG_FEATURE_COMBOS) {
      for (const cur of referenceStates(features)) {
        for (const target of targets) {
          const ref = referenceSetState(cur, target, features);
          let core: string;
          try {
            core = names(migrationPath(cur, target, features)).join(',');
          } catch (err) {
            assert.ok(err instanceof VfioError);
            core = err.errno ?? 'error';
          }
          const mine = ref.ok ? names(ref.arcs.map((a) => a.to)).join(',') : 'EINVAL';
          // The core validates a no-op target like any other (ERROR -> EINVAL; same state -> []).
          if (mine !== core) {
            disagreements.push(
              `flags ${features} ${migStateName(cur)} -> ${migStateName(target)}: ${mine} / ${core}`,
            );
          }
        }
      }
    }
    assert.deepEqual(disagreements, []);
  });
});

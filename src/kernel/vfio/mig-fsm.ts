import { kernelError } from '../../uapi/error.js';
import {
  isMigState,
  MIG_STATE_COUNT,
  type MigFeatureFlags,
  MigState,
  migStateName,
  stateSupported,
} from '../../uapi/migration.js';

const { ERROR: ERR, STOP, RUNNING: RUN, STOP_COPY: SC, RESUMING: RES } = MigState;
const { RUNNING_P2P: RP2P, PRE_COPY: PC, PRE_COPY_P2P: PCP2P } = MigState;

/**
 * The kernel's `vfio_from_fsm_table` for a device with every feature (STOP_COPY|P2P|PRE_COPY):
 * FSM[cur][target] is the next state on the shortest path. Rows and columns are indexed by state
 * number (ERROR=0 … PRE_COPY_P2P=7). Devices with fewer features skip unsupported states by
 * following the table again from the skipped state (see nextMigrationState).
 */
// prettier-ignore
const FSM: readonly (readonly MigState[])[] = [
  /*             ERROR  STOP   RUN    SC     RES    RP2P   PC     PCP2P */
  /* ERROR */   [ERR,   ERR,   ERR,   ERR,   ERR,   ERR,   ERR,   ERR],
  /* STOP */    [ERR,   STOP,  RP2P,  SC,    RES,   RP2P,  RP2P,  RP2P],
  /* RUN */     [ERR,   RP2P,  RUN,   RP2P,  RP2P,  RP2P,  PC,    RP2P],
  /* SC */      [ERR,   STOP,  STOP,  SC,    STOP,  STOP,  ERR,   ERR],
  /* RES */     [ERR,   STOP,  STOP,  STOP,  RES,   STOP,  STOP,  STOP],
  /* RP2P */    [ERR,   STOP,  RUN,   STOP,  STOP,  RP2P,  RUN,   PCP2P],
  /* PC */      [ERR,   RUN,   RUN,   PCP2P, RUN,   RUN,   PC,    PCP2P],
  /* PCP2P */   [ERR,   RP2P,  RP2P,  SC,    RP2P,  RP2P,  PC,    PCP2P],
];

const OP = 'vfio_mig_get_next_state';

/**
 * The next single state on the way from `current` to `target`, exactly as the kernel's
 * `vfio_mig_get_next_state()` with the 2026 ERROR-guard fix: a current or target state the device
 * cannot be in, or a pair with no path (STOP_COPY → PRE_COPY), throws EINVAL.
 * `nextMigrationState(s, s)` is `s`, as in the kernel table.
 */
export function nextMigrationState(current: number, target: number, features: MigFeatureFlags): MigState {
  if (!isMigState(current) || !stateSupported(current, features)) {
    throw kernelError('EINVAL', `current state ${migStateName(current)} is not valid for this device`, {
      op: OP,
    });
  }
  if (!isMigState(target) || !stateSupported(target, features)) {
    throw kernelError('EINVAL', `target state ${migStateName(target)} is not valid for this device`, {
      op: OP,
    });
  }
  let next = FSM[current]![target]!;
  while (next !== ERR && !stateSupported(next, features)) next = FSM[next]![target]!;
  if (next === ERR) {
    throw kernelError('EINVAL', `no transition from ${migStateName(current)} to ${migStateName(target)}`, {
      op: OP,
    });
  }
  return next;
}

/** Every state stepped through from `current` to `target`, excluding `current`; [] when equal. */
export function migrationPath(current: number, target: number, features: MigFeatureFlags): MigState[] {
  const path: MigState[] = [];
  let at: number = current;
  // Any path is at most MIG_STATE_COUNT long; the kernel table has no cycles towards a target.
  while (at !== target) {
    const next = nextMigrationState(at, target, features);
    path.push(next);
    at = next;
    if (path.length > MIG_STATE_COUNT)
      throw kernelError('EINVAL', 'transition path does not converge', { op: OP });
  }
  if (path.length === 0) nextMigrationState(current, target, features); // validates current == target
  return path;
}

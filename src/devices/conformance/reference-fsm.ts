import { MigFeature, MigState, migStateName } from '../../uapi/migration.js';

/**
 * The conformance kit's own model of the VFIO migration v2 state machine, written from the uAPI
 * rules (spec/kernel-uapi.md 1.1, 1.3-1.5) and deliberately not from src/kernel/vfio's table, so
 * that a bug there is a disagreement here and not a shared blind spot.
 *
 * The model is the list of direct arcs a device with a given feature set has (1.4), and the rules
 * the kernel uses to combine them:
 *   - a combined transition is a shortest path of direct arcs;
 *   - the four arcs that open a session (NEW) may only be the last step of a path;
 *   - a saving-group state (PRE_COPY, PRE_COPY_P2P, STOP_COPY) is never in the interior of a path,
 *     except when the move stays inside the group, which never opens a new fd;
 *   - STOP_COPY -> PRE_COPY(_P2P) is forbidden;
 *   - ERROR, numbers >= 8 and states the device lacks are invalid targets; a device in ERROR
 *     refuses every SET. All of these are EINVAL with nothing changed.
 */

const { ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P } = MigState;

/** What a direct arc does to the migration session (1.4 "effect" column). */
export type ArcEffect =
  /** No session involved (stop, resume, P2P quiesce). */
  | 'plain'
  /** Opens a saving session: a new data fd is returned. */
  | 'new-save'
  /** Opens a resuming session: a new data fd is returned. */
  | 'new-resume'
  /** Stays in the saving group; the same fd goes on. */
  | 'continue'
  /** Leaves the saving group; the saving session ends. */
  | 'end-save'
  /** RESUMING -> STOP: loads and validates what was written; the resuming session ends. */
  | 'load';

export interface ReferenceArc {
  readonly from: MigState;
  readonly to: MigState;
  readonly effect: ArcEffect;
}

const { STOP_COPY: SC_FLAG, P2P: P2P_FLAG, PRE_COPY: PC_FLAG } = MigFeature;

/** The states that exist for a device with these VFIO_MIGRATION_* flags (1.1 state_flags_table). */
export function referenceStates(features: number): MigState[] {
  if ((features & SC_FLAG) === 0) return [];
  const states: MigState[] = [STOP, RUNNING, STOP_COPY, RESUMING];
  if (features & P2P_FLAG) states.push(RUNNING_P2P);
  if (features & PC_FLAG) states.push(PRE_COPY);
  if (features & P2P_FLAG && features & PC_FLAG) states.push(PRE_COPY_P2P);
  return states.sort((a, b) => a - b);
}

/** Is `state` a state this device can be in? ERROR never is a valid target. */
export function referenceHasState(state: number, features: number): boolean {
  return (referenceStates(features) as number[]).includes(state);
}

/** The direct arcs of a device with these flags (1.4 table, "needed when" column). */
export function referenceArcs(features: number): ReferenceArc[] {
  if ((features & SC_FLAG) === 0) return [];
  const p2p = (features & P2P_FLAG) !== 0;
  const pc = (features & PC_FLAG) !== 0;
  const arcs: ReferenceArc[] = [];
  const arc = (from: MigState, to: MigState, effect: ArcEffect) => arcs.push({ from, to, effect });
  if (!p2p) {
    arc(RUNNING, STOP, 'plain');
    arc(STOP, RUNNING, 'plain');
  } else {
    arc(RUNNING, RUNNING_P2P, 'plain');
    arc(RUNNING_P2P, RUNNING, 'plain');
    arc(RUNNING_P2P, STOP, 'plain');
    arc(STOP, RUNNING_P2P, 'plain');
  }
  arc(STOP, STOP_COPY, 'new-save');
  arc(STOP_COPY, STOP, 'end-save');
  arc(STOP, RESUMING, 'new-resume');
  arc(RESUMING, STOP, 'load');
  if (pc) {
    arc(RUNNING, PRE_COPY, 'new-save');
    arc(PRE_COPY, RUNNING, 'end-save');
    if (!p2p) arc(PRE_COPY, STOP_COPY, 'continue');
  }
  if (pc && p2p) {
    arc(RUNNING_P2P, PRE_COPY_P2P, 'new-save');
    arc(PRE_COPY_P2P, RUNNING_P2P, 'end-save');
    arc(PRE_COPY, PRE_COPY_P2P, 'continue');
    arc(PRE_COPY_P2P, PRE_COPY, 'continue');
    arc(PRE_COPY_P2P, STOP_COPY, 'continue');
  }
  return arcs;
}

/** The saving group: a session is open and moving inside the group keeps its fd. */
export function isSavingGroup(state: number): boolean {
  return state === PRE_COPY || state === PRE_COPY_P2P || state === STOP_COPY;
}

/** States in which the device has a migration session (and so a live data fd). */
export function hasSession(state: number): boolean {
  return isSavingGroup(state) || state === RESUMING;
}

/** The expected answer of MIG_DEVICE_STATE SET. */
export type ReferenceOutcome =
  | {
      ok: true;
      /** The state GET reports afterwards: the target. */
      state: MigState;
      /** The arcs walked, in order; empty for a no-op. */
      arcs: ReferenceArc[];
      /** The data_fd returned: none (-1), a new saving fd or a new resume fd. */
      fd: 'none' | 'save' | 'resume';
      /** What happens to the session open in the current state: kept (same fd goes on), ended, or there was none. */
      session: 'kept' | 'ended' | 'none';
      /** True when the path loads a resume stream (RESUMING -> STOP is on it). */
      loads: boolean;
    }
  | { ok: false; errno: 'EINVAL'; reason: string };

function einval(reason: string): ReferenceOutcome {
  return { ok: false, errno: 'EINVAL', reason };
}

/** The kernel's answer to SET `target` on a device in `current` with these flags, per the uAPI rules. */
export function referenceSetState(current: number, target: number, features: number): ReferenceOutcome {
  if (!referenceHasState(target, features)) {
    return einval(`target ${migStateName(target)} is not a state of this device`);
  }
  if (current === ERROR) return einval('device is in ERROR; only reset leaves it');
  if (!referenceHasState(current, features)) {
    return einval(`current state ${migStateName(current)} is not a state of this device`);
  }
  const session = hasSession(current) ? 'kept' : 'none';
  if (current === target) {
    return { ok: true, state: target as MigState, arcs: [], fd: 'none', session, loads: false };
  }
  if (current === STOP_COPY && (target === PRE_COPY || target === PRE_COPY_P2P)) {
    return einval('STOP_COPY -> PRE_COPY(_P2P) is forbidden');
  }
  const arcs = shortestPath(current as MigState, target as MigState, features);
  if (!arcs) return einval(`no path from ${migStateName(current)} to ${migStateName(target)}`);
  const last = arcs[arcs.length - 1]!;
  const fd = last.effect === 'new-save' ? 'save' : last.effect === 'new-resume' ? 'resume' : 'none';
  const ends = arcs.some((a) => a.effect === 'end-save' || a.effect === 'load');
  return {
    ok: true,
    state: target as MigState,
    arcs,
    fd,
    session: session === 'none' ? 'none' : ends ? 'ended' : 'kept',
    loads: arcs.some((a) => a.effect === 'load'),
  };
}

/** Breadth-first search over the direct arcs under the path rules; undefined when there is no path. */
function shortestPath(from: MigState, to: MigState, features: number): ReferenceArc[] | undefined {
  const arcs = referenceArcs(features);
  const insideGroup = isSavingGroup(from) && isSavingGroup(to);
  const arcAllowed = (a: ReferenceArc): boolean => {
    if (insideGroup) return a.effect === 'continue';
    if (a.effect === 'new-save' || a.effect === 'new-resume') return a.to === to;
    return true;
  };
  // Interior states: outside the saving group (and RESUMING, only ever entered by a NEW arc).
  const interiorAllowed = (s: MigState): boolean =>
    insideGroup ? isSavingGroup(s) : !isSavingGroup(s) && s !== RESUMING;
  const via = new Map<MigState, ReferenceArc | null>([[from, null]]);
  const queue: MigState[] = [from];
  while (queue.length > 0) {
    const at = queue.shift()!;
    for (const a of arcs) {
      if (a.from !== at || via.has(a.to) || !arcAllowed(a)) continue;
      if (a.to !== to && !interiorAllowed(a.to)) continue;
      via.set(a.to, a);
      if (a.to === to) {
        const path: ReferenceArc[] = [];
        for (let step: ReferenceArc | null = a; step; step = via.get(step.from) ?? null) path.unshift(step);
        return path;
      }
      queue.push(a.to);
    }
  }
  return undefined;
}

/**
 * A legal way from RUNNING (the state of a fresh device) to `state`, as single direct arcs to
 * request one after the other. Undefined for a state the device lacks.
 */
export function referenceRouteFromRunning(state: number, features: number): ReferenceArc[] | undefined {
  const outcome = referenceSetState(RUNNING, state, features);
  return outcome.ok ? outcome.arcs : undefined;
}

/** VFIO device migration protocol v2 numbers (include/uapi/linux/vfio.h). */

/** `enum vfio_device_mig_state`. */
export const MigState = {
  ERROR: 0,
  STOP: 1,
  RUNNING: 2,
  STOP_COPY: 3,
  RESUMING: 4,
  RUNNING_P2P: 5,
  PRE_COPY: 6,
  PRE_COPY_P2P: 7,
} as const;
export type MigState = (typeof MigState)[keyof typeof MigState];

/** Number of defined states; a device_state >= this is invalid. */
export const MIG_STATE_COUNT = 8;

const stateNames = Object.fromEntries(Object.entries(MigState).map(([k, v]) => [v, k])) as Record<
  number,
  keyof typeof MigState
>;

/** `'RUNNING_P2P'` for 5; `'INVALID(9)'` for a number that is no state. */
export function migStateName(state: number): string {
  return stateNames[state] ?? `INVALID(${state})`;
}

export function isMigState(value: number): value is MigState {
  return Number.isInteger(value) && value >= 0 && value < MIG_STATE_COUNT;
}

/** `vfio_device_feature_migration.flags`. */
export const MigFeature = {
  STOP_COPY: 1,
  P2P: 2,
  PRE_COPY: 4,
} as const;
export type MigFeatureFlags = number;

/** Every bit of MigFeature. */
export const MIG_FEATURE_ALL = MigFeature.STOP_COPY | MigFeature.P2P | MigFeature.PRE_COPY;

/** The four flag combinations a driver may register with (STOP_COPY is mandatory). */
export const MIG_FEATURE_COMBOS: readonly MigFeatureFlags[] = [
  MigFeature.STOP_COPY,
  MigFeature.STOP_COPY | MigFeature.P2P,
  MigFeature.STOP_COPY | MigFeature.PRE_COPY,
  MigFeature.STOP_COPY | MigFeature.P2P | MigFeature.PRE_COPY,
];

export function migFeatureNames(flags: MigFeatureFlags): string {
  const names = Object.entries(MigFeature)
    .filter(([, bit]) => (flags & bit) !== 0)
    .map(([name]) => name);
  return names.length ? names.join('|') : '0';
}

/** `state_flags_table`: the feature flags a device needs for a state to exist. ERROR needs all bits. */
export function stateRequiredFlags(state: MigState): number {
  switch (state) {
    case MigState.ERROR:
      return 0xffffffff;
    case MigState.RUNNING_P2P:
      return MigFeature.STOP_COPY | MigFeature.P2P;
    case MigState.PRE_COPY:
      return MigFeature.STOP_COPY | MigFeature.PRE_COPY;
    case MigState.PRE_COPY_P2P:
      return MigFeature.STOP_COPY | MigFeature.P2P | MigFeature.PRE_COPY;
    default:
      return MigFeature.STOP_COPY;
  }
}

export function stateSupported(state: MigState, features: MigFeatureFlags): boolean {
  const need = stateRequiredFlags(state);
  return (need & features) >>> 0 === need >>> 0;
}

/** The states in which a saving session is open ("saving group"). */
export function isSavingState(state: MigState): boolean {
  return state === MigState.PRE_COPY || state === MigState.PRE_COPY_P2P || state === MigState.STOP_COPY;
}

export function isPrecopyState(state: MigState): boolean {
  return state === MigState.PRE_COPY || state === MigState.PRE_COPY_P2P;
}

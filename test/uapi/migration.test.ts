import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  FEATURE_HEADER_BYTES,
  FeatureFlag,
  FeatureId,
  FeaturePayloadBytes,
  LOG_MAX_RANGES,
  PRECOPY_INFO_BYTES,
  VFIO_DEVICE_FEATURE,
  VFIO_DEVICE_RESET,
  VFIO_MIG_GET_PRECOPY_INFO,
} from '../../src/uapi/device-feature.js';
import {
  isMigState,
  isPrecopyState,
  isSavingState,
  MIG_FEATURE_COMBOS,
  MigFeature,
  MigState,
  migFeatureNames,
  migStateName,
  stateRequiredFlags,
  stateSupported,
} from '../../src/uapi/migration.js';

test('ioctl numbers and feature constants are the vfio.h values (spec 1.1)', () => {
  assert.equal(VFIO_DEVICE_FEATURE, 0x3b75);
  assert.equal(VFIO_MIG_GET_PRECOPY_INFO, 0x3b79);
  assert.equal(VFIO_DEVICE_RESET, 0x3b6f);
  assert.deepEqual(FeatureFlag, { MASK: 0xffff, GET: 0x10000, SET: 0x20000, PROBE: 0x40000 });
  assert.equal(FeatureId.MIGRATION, 1);
  assert.equal(FeatureId.MIG_DEVICE_STATE, 2);
  assert.equal(FeatureId.DMA_LOGGING_START, 6);
  assert.equal(FeatureId.DMA_LOGGING_STOP, 7);
  assert.equal(FeatureId.DMA_LOGGING_REPORT, 8);
  assert.equal(FeatureId.MIG_DATA_SIZE, 9);
  assert.equal(FeatureId.PCI_VF_TOKEN, 0);
  assert.equal(FeatureId.BUS_MASTER, 10);
  assert.equal(FeatureId.DMA_BUF, 11);
  assert.equal(FEATURE_HEADER_BYTES, 8);
  assert.deepEqual(FeaturePayloadBytes, {
    MIGRATION: 8,
    MIG_DEVICE_STATE: 8,
    MIG_DATA_SIZE: 8,
    DMA_LOGGING_CONTROL: 24,
    DMA_LOGGING_REPORT: 32,
  });
  assert.equal(PRECOPY_INFO_BYTES, 24);
  assert.equal(LOG_MAX_RANGES, 256);
});

test('migration states and flags are the vfio.h values', () => {
  assert.deepEqual(MigState, {
    ERROR: 0,
    STOP: 1,
    RUNNING: 2,
    STOP_COPY: 3,
    RESUMING: 4,
    RUNNING_P2P: 5,
    PRE_COPY: 6,
    PRE_COPY_P2P: 7,
  });
  assert.deepEqual(MigFeature, { STOP_COPY: 1, P2P: 2, PRE_COPY: 4 });
  assert.deepEqual([...MIG_FEATURE_COMBOS], [1, 3, 5, 7]);
  assert.equal(migStateName(5), 'RUNNING_P2P');
  assert.equal(migStateName(0), 'ERROR');
  assert.equal(migStateName(8), 'INVALID(8)');
  assert.equal(migStateName(-1), 'INVALID(-1)');
  assert.equal(migFeatureNames(7), 'STOP_COPY|P2P|PRE_COPY');
  assert.equal(migFeatureNames(0), '0');
  for (let s = 0; s < 8; s++) assert.ok(isMigState(s));
  for (const s of [8, -1, 1.5, Number.NaN]) assert.ok(!isMigState(s));
});

test('state_flags_table: the flags each state needs; ERROR is never supported', () => {
  const want = [0xffffffff, 1, 1, 1, 1, 3, 5, 7];
  for (let s = 0; s < 8; s++) assert.equal(stateRequiredFlags(s as MigState) >>> 0, want[s]);
  for (const flags of [0, 1, 2, 3, 4, 5, 6, 7]) {
    for (let s = 1; s < 8; s++) {
      assert.equal(stateSupported(s as MigState, flags), (want[s]! & flags) === want[s], `${s} ${flags}`);
    }
    assert.equal(stateSupported(MigState.ERROR, flags), false);
  }
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 7].filter((s) => isSavingState(s as MigState)),
    [3, 6, 7],
  );
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 7].filter((s) => isPrecopyState(s as MigState)),
    [6, 7],
  );
});

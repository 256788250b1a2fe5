import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { DmaPort, MemoryDmaSpace } from '../../../src/kernel/vfio/dma-port.js';
import { VfioDevice } from '../../../src/kernel/vfio/vfio-device.js';
import { VfioError } from '../../../src/uapi/error.js';
import { assertErrno, COMBOS, F_P2P, F_PC, F_SC, makeDevice, S, TestDriver } from './test-driver.js';

// spec 1.1: flags bits and feature ids.
const GET = 1 << 16;
const SET = 1 << 17;
const PROBE = 1 << 18;

interface Feature {
  id: number;
  name: string;
  offered: number;
  structBytes: number;
  needs: 'migration' | 'logging';
  /** A payload a real call would carry. */
  data: () => Record<string, unknown>;
}

const FEATURES: Feature[] = [
  { id: 1, name: 'MIGRATION', offered: GET, structBytes: 8, needs: 'migration', data: () => ({ flags: 0n }) },
  {
    id: 2,
    name: 'MIG_DEVICE_STATE',
    offered: GET | SET,
    structBytes: 8,
    needs: 'migration',
    data: () => ({ deviceState: S.STOP, dataFd: 77 }),
  },
  {
    id: 6,
    name: 'DMA_LOGGING_START',
    offered: SET,
    structBytes: 24,
    needs: 'logging',
    data: () => ({ pageSize: 4096n, numRanges: 1, ranges: [{ iova: 0n, length: 0x10000n }] }),
  },
  { id: 7, name: 'DMA_LOGGING_STOP', offered: SET, structBytes: 0, needs: 'logging', data: () => ({}) },
  {
    id: 8,
    name: 'DMA_LOGGING_REPORT',
    offered: GET,
    structBytes: 32,
    needs: 'logging',
    data: () => ({ iova: 0n, length: 0x10000n, pageSize: 4096n, bitmap: new Uint8Array(8) }),
  },
  {
    id: 9,
    name: 'MIG_DATA_SIZE',
    offered: GET,
    structBytes: 8,
    needs: 'migration',
    data: () => ({ stopCopyLength: 0n }),
  },
];

/** A device that has both migration (all features) and DMA logging. */
const full = () => makeDevice(F_SC | F_P2P | F_PC, { dmaLogging: true });
/** A device lacking what `f` needs: migrationFlags 0, or no DMA logging. */
const lacking = (f: Feature) =>
  f.needs === 'migration' ? makeDevice(0, { dmaLogging: true }) : makeDevice(F_SC | F_P2P | F_PC);

const notOffered = (f: Feature) => (GET | SET) & ~f.offered;
const anOffered = (f: Feature) => (f.offered & GET ? GET : SET);

describe('VFIO_DEVICE_FEATURE validation order (spec 1.2), for every feature id', () => {
  for (const f of FEATURES) {
    describe(`${f.name} (${f.id})`, () => {
      test('argsz < 8 is EINVAL before anything else', () => {
        for (const argsz of [0, 7]) {
          const { dev, drv } = full();
          assertErrno(
            () => dev.deviceFeature({ flags: f.id | anOffered(f), argsz, data: f.data() }),
            'EINVAL',
          );
          // before ENOTTY of a device without the feature
          assertErrno(
            () => lacking(f).dev.deviceFeature({ flags: f.id | anOffered(f), argsz, data: f.data() }),
            'EINVAL',
          );
          // before PROBE success
          assertErrno(() => dev.deviceFeature({ flags: f.id | PROBE | f.offered, argsz }), 'EINVAL');
          assert.deepEqual(drv.calls, []);
        }
      });

      test('unknown flag bits are EINVAL, before ENOTTY and before PROBE success', () => {
        for (const extra of [1 << 19, 1 << 24, 2 ** 31, 2 ** 32, 2 ** 40]) {
          const flags = f.id | anOffered(f) | PROBE;
          assertErrno(() => full().dev.deviceFeature({ flags: flags + extra, data: f.data() }), 'EINVAL');
          assertErrno(() => lacking(f).dev.deviceFeature({ flags: flags + extra, data: f.data() }), 'EINVAL');
        }
        for (const weird of [-1, -(f.id | GET), f.id + 0.5]) {
          assertErrno(() => full().dev.deviceFeature({ flags: weird, data: f.data() }), 'EINVAL');
        }
      });

      test('GET and SET without PROBE are EINVAL, before ENOTTY; with PROBE they are checked against the offer', () => {
        assertErrno(() => full().dev.deviceFeature({ flags: f.id | GET | SET, data: f.data() }), 'EINVAL');
        assertErrno(
          () => lacking(f).dev.deviceFeature({ flags: f.id | GET | SET, data: f.data() }),
          'EINVAL',
        );
        const probeBoth = () => full().dev.deviceFeature({ flags: f.id | GET | SET | PROBE });
        if (f.offered === (GET | SET)) probeBoth();
        else assertErrno(probeBoth, 'EINVAL');
      });

      test('a device without the feature is ENOTTY, before the offer, PROBE, GET/SET and payload checks', () => {
        const { dev, drv } = lacking(f);
        for (const flags of [
          f.id | anOffered(f),
          f.id | (notOffered(f) || GET),
          f.id | PROBE,
          f.id | PROBE | f.offered,
          f.id,
        ]) {
          assertErrno(
            () => dev.deviceFeature({ flags, data: f.data() }),
            'ENOTTY',
            `flags 0x${flags.toString(16)}`,
          );
          assertErrno(() => dev.deviceFeature({ flags, argsz: 8, data: f.data() }), 'ENOTTY');
        }
        assert.deepEqual(drv.calls, []);
        assert.equal(dev.probeFeature(f.id, { get: (f.offered & GET) !== 0 }), false);
      });

      test('an operation the feature does not offer is EINVAL, even with PROBE', () => {
        const bad = notOffered(f);
        if (bad === 0) {
          assert.equal(f.offered, GET | SET);
          return;
        }
        const { dev, drv } = full();
        assertErrno(() => dev.deviceFeature({ flags: f.id | bad, data: f.data() }), 'EINVAL');
        assertErrno(() => dev.deviceFeature({ flags: f.id | bad | PROBE }), 'EINVAL');
        assertErrno(() => dev.deviceFeature({ flags: f.id | bad | PROBE, argsz: 8 }), 'EINVAL');
        assert.equal(dev.probeFeature(f.id, { get: (bad & GET) !== 0, set: (bad & SET) !== 0 }), false);
        assert.deepEqual(drv.calls, []);
      });

      test('PROBE succeeds and does nothing, whatever argsz and payload', () => {
        const { dev, drv } = full();
        const data = f.data();
        const before = structuredClone(data);
        for (const ops of [0, ...[GET, SET, GET | SET].filter((o) => (o & ~f.offered) === 0)]) {
          dev.deviceFeature({ flags: f.id | PROBE | ops, data });
          dev.deviceFeature({ flags: f.id | PROBE | ops, argsz: 8, data }); // payload too small: not checked
        }
        assert.deepEqual(data, before);
        assert.deepEqual(drv.calls, []);
        assert.equal(dev.state, S.RUNNING);
        assert.equal(
          dev.probeFeature(f.id, { get: (f.offered & GET) !== 0, set: (f.offered & SET) !== 0 }),
          true,
        );
        // Nothing was started: a report still says logging is not on.
        if (f.needs === 'logging') {
          assertErrno(() => dev.dmaLoggingReport({ iova: 0n, length: 4096n, pageSize: 4096n }), 'EINVAL');
        }
      });

      test('neither GET nor SET (no PROBE) is EINVAL', () => {
        const { dev, drv } = full();
        assertErrno(() => dev.deviceFeature({ flags: f.id, data: f.data() }), 'EINVAL');
        assert.deepEqual(drv.calls, []);
      });

      test('a payload smaller than the feature struct is EINVAL and does nothing', () => {
        const { dev, drv } = full();
        if (f.structBytes === 0) {
          // LOGGING_STOP has no payload: argsz 8 is enough.
          dev.deviceFeature({ flags: f.id | SET, argsz: 8 });
          return;
        }
        const data = f.data();
        const before = structuredClone(data);
        for (const payload of [0, f.structBytes - 1]) {
          assertErrno(
            () => dev.deviceFeature({ flags: f.id | anOffered(f), argsz: 8 + payload, data }),
            'EINVAL',
          );
        }
        assert.deepEqual(data, before);
        assert.deepEqual(drv.calls, []);
        assert.equal(dev.state, S.RUNNING);
        // an exact or larger payload is fine
        if (f.id === 8) dev.dmaLoggingStart({ pageSize: 4096n, ranges: [{ iova: 0n, length: 4096n }] });
        dev.deviceFeature({ flags: f.id | anOffered(f), argsz: 8 + f.structBytes, data: f.data() });
        if (f.id === 6) dev.dmaLoggingStop();
        dev.deviceFeature({ flags: f.id | anOffered(f), argsz: 8 + f.structBytes + 100, data: f.data() });
      });

      test('a call without a payload struct is EFAULT (copy_from_user)', () => {
        if (f.structBytes === 0) return;
        const { dev } = full();
        assertErrno(() => dev.deviceFeature({ flags: f.id | anOffered(f) }), 'EFAULT');
      });
    });
  }

  test('unknown feature ids are ENOTTY (after the generic checks)', () => {
    const { dev, drv } = full();
    for (const id of [0, 3, 4, 5, 10, 11, 12, 100, 0xffff]) {
      for (const ops of [GET, SET, PROBE, PROBE | GET | SET, 0]) {
        assertErrno(() => dev.deviceFeature({ flags: id | ops, data: {} }), 'ENOTTY', `id ${id}`);
      }
      assertErrno(() => dev.deviceFeature({ flags: id | GET, argsz: 4 }), 'EINVAL');
      assertErrno(() => dev.deviceFeature({ flags: id | GET | SET }), 'EINVAL');
      assertErrno(() => dev.deviceFeature({ flags: id | GET | (1 << 20) }), 'EINVAL');
    }
    assert.deepEqual(drv.calls, []);
  });

  test('a closed device fails every feature call EBADF', () => {
    const { dev } = full();
    dev.close();
    for (const f of FEATURES) assertErrno(() => dev.deviceFeature({ flags: f.id | PROBE }), 'EBADF');
    assertErrno(() => dev.reset(), 'EBADF');
  });
});

describe('feature results', () => {
  test('MIGRATION GET reports the registered flags', () => {
    for (const flags of COMBOS) {
      const { dev } = makeDevice(flags);
      assert.deepEqual(dev.getMigration(), { flags: BigInt(flags) });
      const data = { flags: 123n };
      dev.deviceFeature({ flags: 1 | GET, data });
      assert.equal(data.flags, BigInt(flags));
    }
  });

  test('MIG_DATA_SIZE GET answers in any state', () => {
    const { dev, drv } = makeDevice(F_SC | F_P2P | F_PC);
    for (const state of [
      S.RUNNING,
      S.PRE_COPY,
      S.PRE_COPY_P2P,
      S.STOP_COPY,
      S.STOP,
      S.RESUMING,
      S.RUNNING_P2P,
    ]) {
      dev.setMigDeviceState(state);
      drv.dataSize = BigInt(state) * 1000n;
      assert.equal(dev.getMigDataSize(), BigInt(state) * 1000n);
    }
  });

  test('MIG_DATA_SIZE: a failing driver fails the call only, the state stays', () => {
    for (const error of [new VfioError('VFIO_EIO', 'device gone', { errno: 'EIO' }), new TypeError('bug')]) {
      const { dev, drv } = makeDevice(F_SC | F_PC);
      dev.setMigDeviceState(S.PRE_COPY);
      const stream = drv.saving!;
      drv.failNext('stopCopyLength', error);
      assert.throws(() => dev.getMigDataSize(), VfioError);
      assert.equal(dev.state, S.PRE_COPY);
      assert.equal(stream.ended, false);
    }
  });
});

describe('registration', () => {
  test('the four defined combos and "no migration" register', () => {
    for (const flags of [0, ...COMBOS]) {
      const dev = new VfioDevice({ name: 'd', driver: new TestDriver(flags) });
      assert.equal(dev.state, S.RUNNING);
      assert.equal(dev.hasMigration, flags !== 0);
    }
  });

  test('flags without STOP_COPY or with unknown bits are EINVAL', () => {
    for (const flags of [F_P2P, F_PC, F_P2P | F_PC, 8, F_SC | 8, F_SC | 0x100, F_SC | 0x80000000, -1]) {
      const err = assertErrno(() => new VfioDevice({ name: 'd', driver: new TestDriver(flags) }), 'EINVAL');
      assert.equal(err.op, 'register');
    }
  });

  test('DMA logging without a DMA port is EINVAL', () => {
    assertErrno(
      () => new VfioDevice({ name: 'd', driver: new TestDriver(F_SC, { dmaLogging: true }) }),
      'EINVAL',
    );
    const port = new DmaPort(new MemoryDmaSpace(new Uint8Array(16)));
    new VfioDevice({ name: 'd', driver: new TestDriver(F_SC, { dmaLogging: true }), dma: port });
  });
});

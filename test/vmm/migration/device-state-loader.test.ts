// The destination's per-device loader of switchover state (QEMU's load_state_buffer and load
// thread) and the byte budget of its out-of-order queue, with a fake device: in-order writes,
// queueing and draining, direct streaming, the config packet last, every refusal, the budget's
// accounting, and a model test of random arrival orders under a generous and a tight cap.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import {
  DeviceStateLoader,
  type OfferResult,
  QUEUE_ENTRY_OVERHEAD_BYTES,
  QueueBudget,
} from '../../../src/vmm/migration/device-state-loader.js';
import { MigrationError, MigrationErrorCode } from '../../../src/vmm/migration/migration-error.js';
import { DEVICE_STATE_CONFIG } from '../../../src/vmm/migration/wire-format.js';

const CONFIG = DEVICE_STATE_CONFIG;
const OVERHEAD = QUEUE_ENTRY_OVERHEAD_BYTES;

/** A loader over a fake device that logs every write and config load (copies of the bytes). */
function setup(capBytes = 1 << 20, device = 'nic0') {
  const budget = new QueueBudget(capBytes);
  const log: ({ kind: 'write'; data: number[] } | { kind: 'config'; data: number[] })[] = [];
  const loader = new DeviceStateLoader({
    device,
    budget,
    write: (data) => log.push({ kind: 'write', data: [...data] }),
    loadConfig: (data) => log.push({ kind: 'config', data: [...data] }),
  });
  const written = () => log.filter((e) => e.kind === 'write').flatMap((e) => e.data);
  return { budget, loader, log, written };
}

const packet = (index: number, length = 4) => Uint8Array.from({ length }, (_, i) => (index * 16 + i) & 0xff);

/** What the destination does with one whole packet: stream it if admitted, else offer it. */
function deliver(
  loader: DeviceStateLoader,
  index: number,
  flags: number,
  data: Uint8Array,
): OfferResult | 'direct' {
  if (loader.admit(index, flags, data.length)) {
    loader.writeDirect(data);
    loader.endDirect();
    return 'direct';
  }
  return loader.offer(index, flags, data);
}

function refusal(pattern: RegExp, device = 'nic0') {
  return (err: unknown) => {
    assert.ok(err instanceof MigrationError, String(err));
    assert.equal(err.code, MigrationErrorCode.PROTOCOL);
    assert.equal(err.device, device);
    assert.equal(err.phase, 'stop-copy');
    assert.match(err.message, new RegExp(`^stop-copy: device ${device}: state buffer \\d+: `));
    assert.match(err.message, pattern);
    return true;
  };
}

describe('DeviceStateLoader: order', () => {
  test('in-order packets go straight to the device; the config packet is loaded last', () => {
    const { loader, log, budget } = setup();
    loader.start();
    assert.equal(deliver(loader, 0, 0, packet(0)), 'direct');
    assert.equal(deliver(loader, 1, 0, packet(1)), 'direct');
    assert.equal(loader.complete, false);
    // the config packet is never streamed: admit says no, offer writes it at once
    assert.equal(loader.admit(2, CONFIG, 3), false);
    assert.equal(loader.offer(2, CONFIG, Uint8Array.of(7, 8, 9)), 'written');
    assert.equal(loader.complete, true);
    assert.deepEqual(log, [
      { kind: 'write', data: [...packet(0)] },
      { kind: 'write', data: [...packet(1)] },
      { kind: 'config', data: [7, 8, 9] },
    ]);
    assert.deepEqual(loader.loaded, { packets: 3, bytes: 8 });
    assert.equal(loader.nextIndex, 3);
    assert.equal(budget.peakBytes, 0, 'nothing was queued');
  });

  test('an in-order packet offered whole (not streamed) is written at once', () => {
    const { loader, written } = setup();
    loader.start();
    assert.equal(loader.offer(0, 0, packet(0)), 'written');
    assert.equal(loader.offer(1, 0, packet(1)), 'written');
    assert.deepEqual(written(), [...packet(0), ...packet(1)]);
    assert.equal(loader.nextIndex, 2);
  });

  test('out-of-order packets are queued, then drained in order once the missing one arrives', () => {
    const { loader, written, budget, log } = setup();
    loader.start();
    assert.equal(deliver(loader, 3, CONFIG, packet(3, 2)), 'queued');
    assert.equal(deliver(loader, 2, 0, packet(2, 10)), 'queued');
    assert.equal(deliver(loader, 1, 0, packet(1, 5)), 'queued');
    assert.equal(loader.queuedPackets, 3);
    assert.equal(budget.queuedBytes, 17 + 3 * OVERHEAD);
    assert.equal(log.length, 0);
    assert.equal(deliver(loader, 0, 0, packet(0, 1)), 'direct');
    assert.deepEqual(written(), [...packet(0, 1), ...packet(1, 5), ...packet(2, 10)]);
    assert.deepEqual(log.at(-1), { kind: 'config', data: [...packet(3, 2)] });
    assert.equal(loader.complete, true);
    assert.equal(loader.queuedPackets, 0);
    assert.equal(budget.queuedBytes, 0);
    assert.equal(budget.peakBytes, 17 + 3 * OVERHEAD);
    assert.deepEqual(loader.loaded, { packets: 4, bytes: 16 });
  });

  test('nothing reaches the device before start(): every packet is queued, start() drains them', () => {
    const { loader, log, written, budget } = setup();
    assert.equal(loader.admit(0, 0, 4), false, 'not streamed before the switchover');
    assert.equal(loader.offer(0, 0, packet(0)), 'queued');
    assert.equal(deliver(loader, 1, 0, packet(1)), 'queued');
    assert.equal(deliver(loader, 2, CONFIG, packet(2)), 'queued');
    assert.equal(log.length, 0);
    assert.equal(budget.queuedBytes, 12 + 3 * OVERHEAD);
    let woken = 0;
    budget.onRelease(() => woken++);
    loader.start();
    assert.deepEqual(written(), [...packet(0), ...packet(1)]);
    assert.equal(log.at(-1)?.kind, 'config');
    assert.equal(loader.complete, true);
    assert.equal(budget.queuedBytes, 0);
    assert.equal(woken, 4, 'three releases and the wake of start()');
  });

  test('direct streaming: pieces go to the device as they come; later packets queue meanwhile', () => {
    const { loader, written, budget } = setup();
    loader.start();
    assert.equal(loader.admit(0, 0, 6), true);
    loader.writeDirect(Uint8Array.of(1, 2));
    assert.deepEqual(written(), [1, 2], 'written before the packet is whole');
    // packet 1 arrives whole on another channel while 0 streams: not streamed, queued
    assert.equal(loader.admit(1, 0, 3), false);
    assert.equal(loader.offer(1, 0, Uint8Array.of(9, 9, 9)), 'queued');
    loader.writeDirect(Uint8Array.of(3, 4, 5, 6));
    assert.equal(loader.nextIndex, 0);
    loader.endDirect();
    assert.deepEqual(written(), [1, 2, 3, 4, 5, 6, 9, 9, 9]);
    assert.equal(loader.nextIndex, 2);
    assert.equal(budget.queuedBytes, 0);
    assert.equal(loader.admit(2, 0, 1), true, 'the next one streams again');
  });

  test('the config packet waits for every data packet, even when it is next but one', () => {
    const { loader, log } = setup();
    loader.start();
    assert.equal(deliver(loader, 1, CONFIG, Uint8Array.of(42)), 'queued');
    assert.equal(loader.complete, false);
    assert.equal(deliver(loader, 0, 0, packet(0)), 'direct');
    assert.deepEqual(
      log.map((e) => e.kind),
      ['write', 'config'],
    );
    assert.equal(loader.complete, true);
  });
});

describe('DeviceStateLoader: refusals (ERR_MIGRATION_PROTOCOL naming the device and index)', () => {
  test('a duplicate index: queued, written, or being streamed', () => {
    const { loader } = setup();
    loader.start();
    deliver(loader, 3, 0, packet(3));
    assert.throws(() => loader.admit(3, 0, 4), refusal(/state buffer 3: already filled/));
    deliver(loader, 0, 0, packet(0));
    assert.throws(() => loader.admit(0, 0, 4), refusal(/state buffer 0: already filled/));
    assert.equal(loader.admit(1, 0, 4), true);
    assert.throws(() => loader.admit(1, 0, 4), refusal(/state buffer 1: already filled/));
    assert.throws(() => loader.admit(1, CONFIG, 4), refusal(/state buffer 1: already filled/));
  });

  test('a duplicate of a packet still arriving on another channel is refused when it is offered', () => {
    // Two channels each decode a header for index 1 before either body is whole: both admits
    // pass (nothing is queued yet); the second whole buffer must not overwrite or follow the first.
    const { loader, budget, written } = setup();
    loader.start();
    assert.equal(loader.admit(1, 0, 4), false);
    assert.equal(loader.admit(1, 0, 2), false);
    assert.equal(loader.offer(1, 0, packet(1)), 'queued');
    assert.throws(() => loader.offer(1, 0, Uint8Array.of(6, 6)), refusal(/state buffer 1: already filled/));
    assert.equal(budget.queuedBytes, 4 + OVERHEAD, 'charged once');
    deliver(loader, 0, 0, packet(0));
    assert.deepEqual(written(), [...packet(0), ...packet(1)]);
    // once written, a late duplicate is refused as well
    assert.equal(loader.admit(3, 0, 1), false);
    assert.equal(loader.admit(3, 0, 1), false);
    assert.equal(loader.offer(3, 0, Uint8Array.of(1)), 'queued');
    deliver(loader, 2, 0, packet(2));
    assert.throws(() => loader.offer(3, 0, Uint8Array.of(1)), refusal(/state buffer 3: already filled/));
    assert.equal(budget.queuedBytes, 0);
  });

  test('a held packet offered again after its index was filled by a duplicate is refused', () => {
    const cap = 2 * (100 + OVERHEAD);
    const { loader, budget } = setup(cap);
    loader.start();
    assert.equal(deliver(loader, 2, 0, packet(2, 100)), 'queued');
    assert.equal(loader.admit(1, 0, 200), false);
    assert.equal(loader.offer(1, 0, packet(1, 200)), 'held', 'does not fit beside packet 2');
    // the same index again, small enough to fit
    assert.equal(deliver(loader, 1, 0, packet(1, 10)), 'queued');
    assert.equal(deliver(loader, 0, 0, packet(0)), 'direct');
    assert.equal(budget.queuedBytes, 0);
    assert.throws(() => loader.offer(1, 0, packet(1, 200)), refusal(/state buffer 1: already filled/));
    assert.equal(budget.queuedBytes, 0, 'nothing stays charged for a packet that can never drain');
  });

  test('a held packet retried from a release listener while its duplicate drains is refused', () => {
    // The destination retries held buffers from QueueBudget.onRelease, which the loader calls
    // in the middle of its drain: the index being drained must already count as filled.
    const cap = 3 * (10 + OVERHEAD) + 100;
    const { loader, budget, written } = setup(cap);
    const failures: unknown[] = [];
    const held: { index: number; data: Uint8Array }[] = [];
    budget.onRelease(() => {
      for (const h of held.splice(0)) {
        try {
          if (loader.offer(h.index, 0, h.data) === 'held') held.push(h);
        } catch (err) {
          failures.push(err);
        }
      }
    });
    loader.start();
    assert.equal(deliver(loader, 2, 0, packet(2, 10)), 'queued');
    assert.equal(deliver(loader, 3, 0, packet(3, 10)), 'queued');
    // channel A: packet 1 (500 bytes) does not fit: held
    assert.equal(loader.admit(1, 0, 500), false);
    assert.equal(loader.offer(1, 0, packet(1, 500)), 'held');
    held.push({ index: 1, data: packet(1, 500) });
    // channel B: packet 1 again, 10 bytes: fits
    assert.equal(deliver(loader, 1, 0, packet(1, 10)), 'queued');
    assert.equal(deliver(loader, 0, 0, packet(0)), 'direct');
    assert.equal(failures.length, 1);
    refusal(/state buffer 1: already filled/)(failures[0]);
    assert.deepEqual(written(), [...packet(0), ...packet(1, 10), ...packet(2, 10), ...packet(3, 10)]);
    assert.equal(loader.nextIndex, 4, 'no index skipped');
    assert.equal(budget.queuedBytes, 0);
  });

  test('an index past the config packet, a second config packet, a config packet before a queued one', () => {
    {
      const { loader } = setup();
      loader.start();
      assert.equal(loader.admit(2, CONFIG, 3), false);
      assert.throws(() => loader.admit(3, 0, 3), refusal(/state buffer 3: past the config state, buffer 2/));
      assert.throws(
        () => loader.admit(1, CONFIG, 3),
        refusal(/state buffer 1: a second config state \(the first is buffer 2\)/),
      );
      assert.throws(() => loader.admit(5, CONFIG, 3), refusal(/a second config state/));
    }
    {
      const { loader } = setup();
      deliver(loader, 5, 0, packet(5));
      assert.throws(
        () => loader.admit(3, CONFIG, 3),
        refusal(/state buffer 3: config state before buffer 5, which is queued/),
      );
    }
    {
      // a buffer still arriving when the config packet with a lower index is admitted
      const { loader } = setup();
      assert.equal(loader.admit(4, 0, 4), false);
      assert.equal(deliver(loader, 2, CONFIG, packet(2)), 'queued');
      assert.throws(
        () => loader.offer(4, 0, packet(4)),
        refusal(/state buffer 4: past the config state, buffer 2/),
      );
    }
  });

  test('an empty packet; packets after the state is complete', () => {
    const { loader } = setup();
    loader.start();
    assert.throws(() => loader.admit(0, 0, 0), refusal(/state buffer 0: empty packet/));
    assert.throws(() => loader.admit(0, CONFIG, 0), refusal(/empty packet/));
    deliver(loader, 0, CONFIG, packet(0));
    assert.equal(loader.complete, true);
    assert.throws(
      () => loader.admit(1, 0, 4),
      refusal(/state buffer 1: arrived after the device state was complete/),
    );
    assert.throws(() => loader.admit(0, CONFIG, 4), refusal(/arrived after the device state was complete/));
  });

  test('the device named is the loader’s', () => {
    const { loader } = setup(1 << 20, 'accel0');
    assert.throws(() => loader.admit(0, 0, 0), refusal(/empty packet/, 'accel0'));
  });
});

describe('QueueBudget and the loader’s use of it', () => {
  test('take, give, peak, listeners', () => {
    const budget = new QueueBudget(1000);
    assert.equal(budget.capBytes, 1000);
    const heard: string[] = [];
    const stopA = budget.onRelease(() => heard.push('a'));
    budget.onRelease(() => heard.push('b'));
    assert.equal(budget.tryTake(600), true);
    assert.equal(budget.tryTake(401), false, 'over the cap: refused, nothing taken');
    assert.equal(budget.queuedBytes, 600);
    assert.equal(budget.tryTake(400), true, 'exactly the cap fits');
    assert.equal(budget.peakBytes, 1000);
    budget.give(700);
    assert.deepEqual(heard, ['a', 'b']);
    assert.equal(budget.queuedBytes, 300);
    assert.equal(budget.peakBytes, 1000, 'the peak stays');
    stopA();
    budget.wake();
    assert.deepEqual(heard, ['a', 'b', 'b']);
    assert.equal(budget.queuedBytes, 300, 'a wake releases nothing');
    // a listener may unsubscribe while listeners run
    const stopC = budget.onRelease(() => {
      heard.push('c');
      stopC();
    });
    budget.give(300);
    budget.give(0);
    assert.deepEqual(heard, ['a', 'b', 'b', 'b', 'c', 'b']);
  });

  test('a listener stopped during a release, or running when the release comes, is not called', () => {
    const budget = new QueueBudget(100);
    const calls: string[] = [];
    // x stops y: y, next in line, must not hear this release
    const stopY = () => stopYFn();
    budget.onRelease(() => {
      calls.push('x');
      stopY();
    });
    const stopYFn = budget.onRelease(() => calls.push('y'));
    budget.give(0);
    assert.deepEqual(calls, ['x']);
    // z releases budget from inside itself (as a retried buffer that drains the queue does)
    const budget2 = new QueueBudget(100);
    let depth = 0;
    budget2.tryTake(50);
    budget2.onRelease(() => {
      depth++;
      calls.push(`z${depth}`);
      budget2.give(0);
      depth--;
    });
    budget2.onRelease(() => calls.push('w'));
    budget2.give(10);
    assert.deepEqual(calls, ['x', 'z1', 'w', 'w']);
  });

  test('a held packet that becomes next without a release (streamed or written predecessor) is woken', () => {
    const cap = 100 + OVERHEAD;
    for (const how of ['streamed', 'offered'] as const) {
      const { loader, budget, written } = setup(cap);
      loader.start();
      assert.equal(deliver(loader, 2, 0, packet(2, 100)), 'queued');
      assert.equal(loader.admit(1, 0, 50), false);
      assert.equal(loader.offer(1, 0, packet(1, 50)), 'held');
      const results: OfferResult[] = [];
      const stop = budget.onRelease(() => {
        const result = loader.offer(1, 0, packet(1, 50));
        results.push(result);
        if (result !== 'held') stop();
      });
      if (how === 'streamed') assert.equal(deliver(loader, 0, 0, packet(0)), 'direct');
      else assert.equal(loader.offer(0, 0, packet(0)), 'written');
      assert.deepEqual(results, ['written'], how);
      assert.deepEqual(written(), [...packet(0), ...packet(1, 50), ...packet(2, 100)]);
      assert.equal(budget.queuedBytes, 0);
    }
  });

  test('queued bytes cost their length plus QUEUE_ENTRY_OVERHEAD_BYTES; a packet that does not fit is held', () => {
    const cap = 3 * (1000 + OVERHEAD);
    const { loader, budget } = setup(cap);
    loader.start();
    for (const index of [1, 2, 3]) assert.equal(deliver(loader, index, 0, packet(index, 1000)), 'queued');
    assert.equal(budget.queuedBytes, cap);
    assert.equal(deliver(loader, 4, 0, packet(4, 1)), 'held', 'even one byte more does not fit');
    assert.equal(budget.queuedBytes, cap, 'a held packet takes nothing');
    assert.equal(loader.queuedPackets, 3);
    assert.equal(budget.peakBytes, cap);
    // the next one in order is never held: it goes to the device
    assert.equal(deliver(loader, 0, 0, packet(0, 5000)), 'direct');
    assert.equal(budget.queuedBytes, 0);
    assert.equal(loader.offer(4, 0, packet(4, 1)), 'written');
  });

  test('a flood of tiny packets is bounded by the overhead', () => {
    const cap = (1 << 20) + 4096;
    const { loader, budget } = setup(cap);
    loader.start();
    let index = 1;
    while (deliver(loader, index, 0, Uint8Array.of(1)) === 'queued') index++;
    assert.equal(index - 1, Math.floor(cap / (1 + OVERHEAD)));
    assert.ok(budget.peakBytes <= cap);
  });

  test('discard() drops the queue and gives every byte back, telling the listeners', () => {
    const { loader, budget } = setup();
    deliver(loader, 1, 0, packet(1, 100));
    deliver(loader, 2, 0, packet(2, 50));
    let releases = 0;
    budget.onRelease(() => releases++);
    loader.discard();
    assert.equal(budget.queuedBytes, 0);
    assert.equal(loader.queuedPackets, 0);
    assert.equal(releases, 2);
    assert.equal(budget.peakBytes, 150 + 2 * OVERHEAD);
    loader.discard();
    assert.equal(budget.queuedBytes, 0);
  });

  test('one budget shared by several loaders', () => {
    const budget = new QueueBudget(2 * (10 + OVERHEAD));
    const make = (device: string) =>
      new DeviceStateLoader({ device, budget, write: () => undefined, loadConfig: () => undefined });
    const a = make('a');
    const b = make('b');
    assert.equal(deliver(a, 1, 0, packet(1, 10)), 'queued');
    assert.equal(deliver(b, 1, 0, packet(1, 10)), 'queued');
    assert.equal(deliver(b, 2, 0, packet(2, 1)), 'held');
    a.start();
    assert.equal(deliver(a, 0, 0, packet(0)), 'direct');
    assert.equal(budget.queuedBytes, 10 + OVERHEAD);
    assert.equal(b.offer(2, 0, packet(2, 1)), 'queued');
  });
});

// ---- model test ---------------------------------------------------------------------------------

/** N packets (random sizes), the last one the config packet, offered in a random order. */
const scenario = fc.array(fc.integer({ min: 1, max: 3000 }), { minLength: 1, maxLength: 24 }).chain((sizes) =>
  fc.record({
    sizes: fc.constant(sizes),
    order: fc.shuffledSubarray(
      sizes.map((_, i) => i),
      { minLength: sizes.length, maxLength: sizes.length },
    ),
    startAt: fc.integer({ min: 0, max: sizes.length }),
    streamed: fc.boolean(),
  }),
);

function expected(sizes: number[]): { data: number[]; config: number[] } {
  const data = sizes.slice(0, -1).flatMap((n, i) => [...packet(i, n)]);
  return { data, config: [...packet(sizes.length - 1, sizes.at(-1)!)] };
}

describe('DeviceStateLoader: model test', () => {
  test('any arrival order with a generous cap gives exactly the in-order byte stream', () => {
    fc.assert(
      fc.property(scenario, ({ sizes, order, startAt, streamed }) => {
        const { loader, log, written, budget } = setup(1 << 30);
        const last = sizes.length - 1;
        order.forEach((index, k) => {
          if (k === startAt) loader.start();
          const flags = index === last ? CONFIG : 0;
          const data = packet(index, sizes[index]!);
          // streamed: as the destination does (admit, then stream in two pieces or offer whole);
          // else every packet offered whole, without admit
          if (streamed && loader.admit(index, flags, data.length)) {
            loader.writeDirect(data.subarray(0, data.length >> 1));
            loader.writeDirect(data.subarray(data.length >> 1));
            loader.endDirect();
          } else {
            assert.notEqual(loader.offer(index, flags, data), 'held');
          }
        });
        if (startAt === order.length) loader.start();
        const want = expected(sizes);
        assert.deepEqual(written(), want.data);
        assert.deepEqual(log.at(-1), { kind: 'config', data: want.config });
        assert.equal(log.filter((e) => e.kind === 'config').length, 1);
        assert.equal(loader.complete, true);
        assert.equal(budget.queuedBytes, 0);
        assert.deepEqual(loader.loaded, { packets: sizes.length, bytes: want.data.length });
      }),
      { numRuns: 300 },
    );
  });

  test('with a tight cap, retrying held packets on every release never loses or reorders a byte', () => {
    fc.assert(
      fc.property(
        scenario,
        fc.integer({ min: 3000 + OVERHEAD, max: 12_000 }),
        ({ sizes, order, startAt }, cap) => {
          const { loader, log, written, budget } = setup(cap);
          const last = sizes.length - 1;
          // what the destination does: a held packet stays with its channel, which retries it
          // on every release (and wake) until it is taken, then stops listening
          const held = new Set<number>();
          const flagsOf = (index: number) => (index === last ? CONFIG : 0);
          const hold = (index: number, data: Uint8Array) => {
            held.add(index);
            const stop = budget.onRelease(() => {
              if (loader.offer(index, flagsOf(index), data) !== 'held') {
                stop();
                held.delete(index);
              }
              assert.ok(budget.queuedBytes <= cap);
            });
          };
          order.forEach((index, k) => {
            if (k === startAt) loader.start();
            const data = packet(index, sizes[index]!);
            const result = deliver(loader, index, flagsOf(index), data);
            assert.ok(budget.queuedBytes <= cap, `${budget.queuedBytes} queued, cap ${cap}`);
            if (result === 'held') hold(index, data);
          });
          if (startAt === order.length) loader.start();
          assert.equal(held.size, 0, 'every held packet was taken once the switchover started');
          const want = expected(sizes);
          assert.deepEqual(written(), want.data);
          assert.deepEqual(log.at(-1), { kind: 'config', data: want.config });
          assert.equal(loader.complete, true);
          assert.equal(budget.queuedBytes, 0);
          assert.ok(budget.peakBytes <= cap);
        },
      ),
      { numRuns: 300 },
    );
  });
});

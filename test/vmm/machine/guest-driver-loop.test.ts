import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { GuestDriverLoop } from '../../../src/vmm/machine/guest-driver-loop.js';

test('the guest driver loop ticks every target in order until stopped', async () => {
  const seen: string[] = [];
  const loop = new GuestDriverLoop(
    [
      { name: 'a', tick: () => seen.push('a') },
      { name: 'b', tick: () => seen.push('b') },
    ],
    { intervalMs: 2, onError: () => assert.fail('no error') },
  );
  loop.start();
  assert.equal(loop.running, true);
  const keepAlive = setInterval(() => {}, 1000);
  while (loop.ticks < 3) await sleep(2);
  loop.stop();
  clearInterval(keepAlive);
  const ticks = loop.ticks;
  assert.deepEqual(seen.slice(0, 4), ['a', 'b', 'a', 'b']);
  assert.equal(seen.length, ticks * 2);
  await sleep(10);
  assert.equal(loop.ticks, ticks, 'no tick after stop');
});

test('a target that throws stops the loop and is reported', () => {
  const errors: [string, unknown][] = [];
  let after = 0;
  const loop = new GuestDriverLoop(
    [
      {
        name: 'broken',
        tick: () => {
          throw new Error('boom');
        },
      },
      { name: 'next', tick: () => after++ },
    ],
    { onError: (target, err) => errors.push([target, err]) },
  );
  loop.start();
  loop.tickOnce();
  assert.equal(loop.running, false);
  assert.equal(errors.length, 1);
  assert.equal(errors[0]![0], 'broken');
  assert.equal(after, 0, 'targets after it are not ticked');
  assert.throws(() => new GuestDriverLoop([], { intervalMs: 0, onError: () => {} }), {
    code: 'ERR_INVALID_ARGUMENT',
  });
});

import assert from 'node:assert/strict';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { describe, test } from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import type { ResumeStream, SavingStream } from '../../../src/kernel/vfio/mig-data-stream.js';
import { kernelError, VfioError } from '../../../src/uapi/error.js';
import {
  assertErrno,
  assertRejectsErrno,
  bytes,
  concat,
  F_P2P,
  F_PC,
  F_SC,
  makeDevice,
  S,
  type TestSavingSession,
} from './test-driver.js';

// spec 1.1: `_IO(';', 100 + 21)` and `_IO(';', 100 + 17)`.
const VFIO_MIG_GET_PRECOPY_INFO = 0x3b79;
const VFIO_DEVICE_FEATURE = 0x3b75;
const FULL = F_SC | F_P2P | F_PC;

const INITIAL = bytes(1, 2, 3, 4, 5, 6, 7, 8, 9, 10);
const FINAL = bytes(0xf0, 0xf1, 0xf2);

function precopyDevice(flags = F_SC | F_PC) {
  const made = makeDevice(flags);
  const fd = made.dev.setMigDeviceState(S.PRE_COPY) as SavingStream;
  return { ...made, fd, session: made.drv.saving as TestSavingSession };
}

/** Has the promise settled after the event loop had a turn? */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(
    () => {
      done = true;
    },
    () => {
      done = true;
    },
  );
  await tick();
  await tick();
  return done;
}

describe('saving stream in STOP_COPY', () => {
  test('reads the stream in order, then returns 0 forever (never ENOMSG), without asking the driver again', () => {
    const { dev, drv } = makeDevice(F_SC);
    const fd = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    const got: Uint8Array[] = [];
    for (let chunk = fd.read(4); chunk.length > 0; chunk = fd.read(4)) got.push(chunk);
    assert.deepEqual(
      got.map((c) => [...c]),
      [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0xf0, 0xf1], [0xf2]],
    );
    const reads = drv.calls.filter((c) => c === 'read').length;
    drv.saving!.addDirty(bytes(99)); // the driver would have more: the end is still the end
    for (let i = 0; i < 5; i++) {
      assert.equal(fd.readInto(new Uint8Array(16)), 0);
      assert.equal(fd.read().length, 0);
    }
    assert.equal(drv.calls.filter((c) => c === 'read').length, reads);
  });

  test('a zero-length read returns 0 without reading', () => {
    const { dev, drv } = makeDevice(F_SC);
    const fd = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    drv.takeCalls();
    assert.equal(fd.readInto(new Uint8Array(0)), 0);
    assert.deepEqual(drv.calls, []);
    assert.deepEqual(fd.read(100), concat([INITIAL, FINAL]));
  });

  test('dies when STOP_COPY -> STOP ends the session: ENODEV, but the fd stays open', () => {
    const { dev } = makeDevice(F_SC);
    const fd = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    fd.read(2);
    dev.setMigDeviceState(S.STOP);
    assert.equal(fd.live, false);
    assert.equal(fd.closed, false);
    assertErrno(() => fd.read(), 'ENODEV');
    assertErrno(() => fd.readInto(new Uint8Array(1)), 'ENODEV');
    // a new session is a new fd, from the beginning
    const again = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    assert.notEqual(again, fd);
    assert.deepEqual(again.read(3), bytes(1, 2, 3));
    assertErrno(() => fd.read(), 'ENODEV');
  });
});

describe('saving stream in PRE_COPY', () => {
  test('ENOMSG when nothing is there now; more data later; precopy info follows the reads', () => {
    const { fd, session } = precopyDevice();
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 10n, dirtyBytes: 0n });
    assert.deepEqual(fd.read(4), bytes(1, 2, 3, 4));
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 6n, dirtyBytes: 0n });
    assert.deepEqual(fd.read(), bytes(5, 6, 7, 8, 9, 10));
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 0n, dirtyBytes: 0n });
    assertErrno(() => fd.read(), 'ENOMSG');
    assertErrno(() => fd.readInto(new Uint8Array(8)), 'ENOMSG');
    session.addDirty(bytes(0x21, 0x22, 0x23));
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 0n, dirtyBytes: 3n });
    assert.deepEqual(fd.read(2), bytes(0x21, 0x22));
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 0n, dirtyBytes: 1n });
    assert.deepEqual(fd.read(), bytes(0x23));
    assertErrno(() => fd.read(), 'ENOMSG');
    assertErrno(() => fd.read(), 'ENOMSG'); // a temporary end, not an end
  });

  test('also in PRE_COPY_P2P', () => {
    const { dev, fd } = precopyDevice(FULL);
    assert.equal(dev.setMigDeviceState(S.PRE_COPY_P2P), -1);
    assert.deepEqual(fd.read(), INITIAL);
    assertErrno(() => fd.read(), 'ENOMSG');
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 0n, dirtyBytes: 0n });
  });

  test('PRE_COPY -> STOP_COPY: the same stream goes on with the final data and then ends', () => {
    for (const flags of [F_SC | F_PC, FULL]) {
      const { dev, fd, session } = precopyDevice(flags);
      assert.deepEqual(fd.read(3), bytes(1, 2, 3));
      session.addDirty(bytes(0x30));
      assert.equal(dev.setMigDeviceState(S.STOP_COPY), -1);
      assert.equal(fd.live, true);
      assert.deepEqual(fd.read(), bytes(4, 5, 6, 7, 8, 9, 10, 0x30, 0xf0, 0xf1, 0xf2));
      assert.equal(fd.read().length, 0);
      assert.equal(fd.read().length, 0);
    }
  });

  test('PRE_COPY -> RUNNING ends the session: the fd is dead', () => {
    const { dev, fd, session } = precopyDevice();
    dev.setMigDeviceState(S.RUNNING);
    assert.equal(session.ended, true);
    assertErrno(() => fd.read(), 'ENODEV');
  });
});

describe('VFIO_MIG_GET_PRECOPY_INFO', () => {
  test('other ioctl numbers are ENOTTY, checked before argsz and state', () => {
    const { dev, fd } = precopyDevice();
    for (const cmd of [VFIO_DEVICE_FEATURE, 0, VFIO_MIG_GET_PRECOPY_INFO + 1]) {
      assertErrno(() => fd.ioctl(cmd), 'ENOTTY');
      assertErrno(() => fd.ioctl(cmd, { argsz: 0 }), 'ENOTTY');
    }
    dev.setMigDeviceState(S.STOP_COPY);
    assertErrno(() => fd.ioctl(VFIO_DEVICE_FEATURE, { argsz: 1 }), 'ENOTTY');
  });

  test('argsz below 24 is EINVAL, before the state check; 24 and more are fine', () => {
    const { dev, fd } = precopyDevice();
    for (const argsz of [0, 8, 16, 23]) assertErrno(() => fd.precopyInfo({ argsz }), 'EINVAL');
    assert.deepEqual(fd.ioctl(VFIO_MIG_GET_PRECOPY_INFO, { argsz: 24 }), {
      initialBytes: 10n,
      dirtyBytes: 0n,
    });
    assert.deepEqual(fd.precopyInfo({ argsz: 4096 }), { initialBytes: 10n, dirtyBytes: 0n });
    dev.setMigDeviceState(S.STOP_COPY);
    const err = assertErrno(() => fd.precopyInfo({ argsz: 23 }), 'EINVAL');
    assert.match(err.message, /argsz/);
  });

  test('EINVAL outside PRE_COPY/PRE_COPY_P2P (STOP_COPY on the same live fd), without asking the driver', () => {
    const { dev, drv, fd } = precopyDevice(FULL);
    dev.setMigDeviceState(S.PRE_COPY_P2P);
    assert.deepEqual(fd.precopyInfo(), { initialBytes: 10n, dirtyBytes: 0n });
    dev.setMigDeviceState(S.STOP_COPY);
    drv.takeCalls();
    const err = assertErrno(() => fd.precopyInfo(), 'EINVAL');
    assert.match(err.message, /STOP_COPY/);
    assert.deepEqual(drv.calls, []);
    assert.equal(fd.live, true);
  });

  test('a dead fd: EINVAL when the device left precopy, ENODEV when a new precopy session runs', () => {
    const { dev, fd } = precopyDevice();
    dev.setMigDeviceState(S.RUNNING);
    assertErrno(() => fd.precopyInfo(), 'EINVAL');
    const fresh = dev.setMigDeviceState(S.PRE_COPY) as SavingStream;
    assertErrno(() => fd.precopyInfo(), 'ENODEV');
    assert.deepEqual(fresh.precopyInfo(), { initialBytes: 10n, dirtyBytes: 0n });
  });
});

describe('fd lifetime: close, ESPIPE', () => {
  test('after close() every call is EBADF; the session itself goes on', () => {
    const { dev, drv, fd } = precopyDevice();
    fd.close();
    assert.equal(fd.closed, true);
    assert.equal(fd.live, false);
    assertErrno(() => fd.read(), 'EBADF');
    assertErrno(() => fd.precopyInfo(), 'EBADF');
    assertErrno(() => fd.ioctl(0), 'EBADF');
    assertErrno(() => fd.lseek(0, 0), 'EBADF');
    assertErrno(() => fd.pread(new Uint8Array(1), 0), 'EBADF');
    assert.equal(dev.state, S.PRE_COPY);
    assert.equal(drv.saving!.ended, false);
    // the state machine is unaffected; a later session is a new fd
    dev.setMigDeviceState(S.STOP_COPY);
    assert.equal(drv.saving!.ended, false);
    dev.setMigDeviceState(S.STOP);
    assert.equal(drv.saving!.ended, true);
    assertErrno(() => fd.read(), 'EBADF');
  });

  test('lseek/pread/pwrite are ESPIPE, on live and on dead fds', () => {
    const { dev } = makeDevice(F_SC);
    const save = dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    assertErrno(() => save.lseek(0, 0), 'ESPIPE');
    assertErrno(() => save.pread(new Uint8Array(4), 0), 'ESPIPE');
    dev.setMigDeviceState(S.STOP);
    assertErrno(() => save.lseek(10, 1), 'ESPIPE');
    const resume = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    assertErrno(() => resume.lseek(0, 2), 'ESPIPE');
    assertErrno(() => resume.pwrite(bytes(1), 0), 'ESPIPE');
    resume.close();
    assertErrno(() => resume.pwrite(bytes(1), 0), 'EBADF');
  });
});

describe('resume stream', () => {
  test('appends writes in order; chunking is free; finish sees the exact bytes', () => {
    const { dev, drv } = makeDevice(F_SC);
    dev.setMigDeviceState(S.STOP);
    const fd = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    assert.equal(fd.write(bytes(1, 2, 3)), 3);
    assert.equal(fd.write(bytes()), 0);
    assert.equal(fd.write(bytes(4)), 1);
    assert.equal(fd.write(bytes(5, 6)), 2);
    assert.equal(fd.bytesWritten, 6);
    assert.deepEqual(
      drv.calls.filter((c) => c.startsWith('write')),
      ['write(3)', 'write(1)', 'write(2)'],
    );
    dev.setMigDeviceState(S.STOP);
    assert.deepEqual(drv.loaded, bytes(1, 2, 3, 4, 5, 6));
    assertErrno(() => fd.write(bytes(7)), 'ENODEV');
  });

  test('writeFrom without a driver writeFrom stages the bytes fill produced and writes exactly them', () => {
    const { dev, drv } = makeDevice(F_SC);
    dev.setMigDeviceState(S.STOP);
    const fd = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    assert.equal(
      fd.writeFrom((buf) => {
        buf.set(bytes(9, 8, 7));
        return 3;
      }, 16),
      3,
    );
    assert.equal(
      fd.writeFrom(() => 0),
      0,
    );
    assert.equal(fd.bytesWritten, 3);
    dev.setMigDeviceState(S.STOP);
    assert.deepEqual(drv.loaded, bytes(9, 8, 7));
    assertErrno(() => fd.writeFrom(() => 0), 'ENODEV');
  });

  test('has no ioctls (ENOTTY); a driver write error reaches the caller with its errno and the device name', () => {
    const { dev, drv } = makeDevice(F_SC, { name: 'acc1' });
    dev.setMigDeviceState(S.STOP);
    const fd = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    assertErrno(() => fd.ioctl(VFIO_MIG_GET_PRECOPY_INFO), 'ENOTTY');
    drv.failNext('write(2)', kernelError('EINVAL', 'bad header'));
    const err = assertErrno(() => fd.write(bytes(9, 9)), 'EINVAL');
    assert.equal(err.target, 'acc1');
    assert.equal(fd.bytesWritten, 0);
    assert.equal(dev.state, S.RESUMING);
  });

  test('a dead resume fd after reset', () => {
    const { dev, drv } = makeDevice(F_SC);
    dev.setMigDeviceState(S.STOP);
    const fd = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    dev.reset();
    assert.equal(drv.resuming!.ended, true);
    assertErrno(() => fd.write(bytes(1)), 'ENODEV');
  });
});

describe('driver errors on the saving stream', () => {
  test('read: a driver VfioError gets the device name; a non-VfioError is ERR_INTERNAL; the state stays', () => {
    const { dev, drv, fd } = precopyDevice(F_SC | F_PC);
    drv.failNext('read', kernelError('EIO', 'dma failed'));
    const err = assertErrno(() => fd.read(), 'EIO');
    assert.equal(err.target, 'dev0');
    drv.failNext('read', new RangeError('oops'));
    assert.throws(
      () => fd.read(),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
    );
    drv.failNext('precopyInfo', new RangeError('oops'));
    assert.throws(
      () => fd.precopyInfo(),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
    );
    assert.equal(dev.state, S.PRE_COPY);
    assert.deepEqual(fd.read(), INITIAL);
  });

  test('a driver read that claims more bytes than the buffer holds is an internal error', () => {
    const { fd, session } = precopyDevice();
    session.read = () => 100;
    assert.throws(
      () => fd.read(10),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
    );
    session.read = () => -1;
    assert.throws(
      () => fd.read(10),
      (e: unknown) => e instanceof VfioError && e.code === 'ERR_INTERNAL',
    );
  });
});

describe('helpers: chunks(), async iterator, poll(), Node streams', () => {
  test('chunks() yields what is readable now and stops at ENOMSG (precopy) or the end (stop-copy)', () => {
    const { dev, fd, session } = precopyDevice();
    assert.deepEqual(
      [...fd.chunks(4)].map((c) => [...c]),
      [
        [1, 2, 3, 4],
        [5, 6, 7, 8],
        [9, 10],
      ],
    );
    assert.deepEqual([...fd.chunks(4)], []);
    session.addDirty(bytes(0x40, 0x41));
    dev.setMigDeviceState(S.STOP_COPY);
    assert.deepEqual(concat([...fd.chunks(2)]), bytes(0x40, 0x41, 0xf0, 0xf1, 0xf2));
    assert.deepEqual([...fd.chunks(2)], []);
  });

  test('the async iterator waits through ENOMSG until dataReady(), then until STOP_COPY, then ends', async () => {
    const { dev, fd, session } = precopyDevice();
    const got: Uint8Array[] = [];
    const all = (async () => {
      for await (const chunk of fd) got.push(chunk);
    })();
    assert.equal(await settled(all), false);
    assert.deepEqual(concat(got), INITIAL);
    session.addDirty(bytes(0x50)); // calls dataReady()
    assert.equal(await settled(all), false);
    assert.deepEqual(concat(got), concat([INITIAL, bytes(0x50)]));
    dev.setMigDeviceState(S.STOP_COPY); // the state change wakes the reader
    await all;
    assert.deepEqual(concat(got), concat([INITIAL, bytes(0x50), FINAL]));
  });

  test('the async iterator fails ENODEV when the session ends while it waits, EBADF when the fd is closed', async () => {
    {
      const { dev, fd } = precopyDevice();
      const all = (async () => {
        for await (const _ of fd);
      })();
      assert.equal(await settled(all), false);
      dev.setMigDeviceState(S.RUNNING);
      await assertRejectsErrno(all, 'ENODEV');
    }
    {
      const { fd } = precopyDevice();
      const all = (async () => {
        for await (const _ of fd);
      })();
      assert.equal(await settled(all), false);
      fd.close();
      await assertRejectsErrno(all, 'EBADF');
    }
  });

  test('poll(): waits in precopy until data or a state change; ready at once when dead, closed or in STOP_COPY', async () => {
    const { dev, fd, session } = precopyDevice();
    fd.read();
    let p = fd.poll();
    assert.equal(await settled(p), false);
    session.addDirty(bytes(1));
    assert.equal(await settled(p), true);
    p = fd.poll();
    assert.equal(await settled(p), false);
    dev.setMigDeviceState(S.STOP_COPY);
    assert.equal(await settled(p), true);
    assert.equal(await settled(fd.poll()), true); // STOP_COPY never blocks a reader
    dev.setMigDeviceState(S.STOP);
    assert.equal(await settled(fd.poll()), true); // dead: ready, a read tells ENODEV
    const other = precopyDevice();
    other.fd.read();
    other.fd.close();
    assert.equal(await settled(other.fd.poll()), true);
  });

  test('poll() with an AbortSignal rejects on abort, and at once when already aborted', async () => {
    const { fd } = precopyDevice();
    fd.read();
    const ac = new AbortController();
    const p = fd.poll(ac.signal);
    assert.equal(await settled(p), false);
    ac.abort(new Error('give up'));
    await assert.rejects(p, /give up/);
    await assert.rejects(fd.poll(AbortSignal.abort(new Error('already'))), /already/);
  });

  test('toReadable(): the whole stream through precopy and stop-copy, as a Node Readable', async () => {
    const { dev, fd, session } = precopyDevice();
    const readable = fd.toReadable();
    const parts: Buffer[] = [];
    const done = new Promise<void>((resolve, reject) => {
      readable.on('data', (b: Buffer) => parts.push(b));
      readable.on('end', resolve);
      readable.on('error', reject);
    });
    await tick();
    session.addDirty(bytes(0x60, 0x61));
    await tick();
    dev.setMigDeviceState(S.STOP_COPY);
    await done;
    assert.deepEqual(new Uint8Array(Buffer.concat(parts)), concat([INITIAL, bytes(0x60, 0x61), FINAL]));
  });

  test('toWritable(): source stream piped into a destination device loads the exact bytes', async () => {
    const src = makeDevice(F_SC);
    const dst = makeDevice(F_SC, { name: 'dst' });
    const out = src.dev.setMigDeviceState(S.STOP_COPY) as SavingStream;
    dst.dev.setMigDeviceState(S.STOP);
    const input = dst.dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    await pipeline(out.toReadable(), input.toWritable());
    dst.dev.setMigDeviceState(S.STOP);
    assert.deepEqual(dst.drv.loaded, concat([INITIAL, FINAL]));
    assert.equal(input.bytesWritten, 13);
  });

  test('toWritable() reports write errors (a dead fd: ENODEV)', async () => {
    const { dev } = makeDevice(F_SC);
    dev.setMigDeviceState(S.STOP);
    const input = dev.setMigDeviceState(S.RESUMING) as ResumeStream;
    dev.setMigDeviceState(S.STOP);
    await assertRejectsErrno(pipeline(Readable.from([Buffer.from([1, 2])]), input.toWritable()), 'ENODEV');
  });
});

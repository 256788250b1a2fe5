import assert from 'node:assert/strict';
import { test } from 'node:test';
import { Errno, isErrnoName } from '../../src/uapi/errno.js';
import { kernelError, VfioError } from '../../src/uapi/error.js';

test('errno numbers are Linux numbers', () => {
  assert.equal(Errno.EINVAL, 22);
  assert.equal(Errno.ENOMSG, 42);
  assert.equal(Errno.EMSGSIZE, 90);
  assert.equal(Errno.EADDRINUSE, 98);
  assert.ok(isErrnoName('ENOTTY'));
  assert.ok(!isErrnoName('EWHATEVER'));
});

test('kernelError carries errno, code, and names device and operation', () => {
  const err = kernelError('EBUSY', 'still attached', { target: 'nic0', op: 'DESTROY' });
  assert.ok(err instanceof VfioError);
  assert.equal(err.errno, 'EBUSY');
  assert.equal(err.errnoNumber, 16);
  assert.equal(err.code, 'VFIO_EBUSY');
  assert.equal(err.message, 'nic0: DESTROY: still attached');
});

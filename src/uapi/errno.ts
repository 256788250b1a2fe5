/** Linux errno numbers (asm-generic/errno-base.h, errno.h) that the modeled uAPI can return. */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EIO: 5,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  EINVAL: 22,
  ENOTTY: 25,
  ENOSPC: 28,
  ESPIPE: 29,
  EDEADLOCK: 35,
  ENOMSG: 42,
  EOVERFLOW: 75,
  EMSGSIZE: 90,
  EOPNOTSUPP: 95,
  EADDRINUSE: 98,
} as const;

export type ErrnoName = keyof typeof Errno;

export function isErrnoName(name: string): name is ErrnoName {
  return Object.hasOwn(Errno, name);
}

import { kernelError } from '../../uapi/error.js';

/** A kernel error from a helper, tagged with the ioctl it failed in (other errors pass through). */
export function withOp(err: unknown, op: string): unknown {
  if (err && typeof err === 'object' && 'errno' in err && (err as { errno?: string }).errno !== undefined) {
    const e = err as { errno: string; message: string; op?: string };
    if (e.op === undefined) return kernelError(e.errno as never, e.message, { op });
  }
  return err;
}

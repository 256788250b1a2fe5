import { VfioError } from '../../uapi/error.js';

/** Error codes of the software host and its control API (beside the machine's and the kernel's). */
export const HostErrorCode = {
  /** No VM of that name on the host. */
  VM_NOT_FOUND: 'ERR_VM_NOT_FOUND',
  /** A VM of that name exists already. */
  VM_EXISTS: 'ERR_VM_EXISTS',
  /** The VM is not in a state the operation accepts (start a running VM, stop a created one, …). */
  VM_STATE: 'ERR_VM_STATE',
  /** The VM has no migration to query or cancel. */
  NO_MIGRATION: 'ERR_NO_MIGRATION',
  /** The host's budget (VM count, memory) does not take the VM. */
  HOST_LIMIT: 'ERR_HOST_LIMIT',
  /** The host is shutting down and takes no new work. */
  SHUTTING_DOWN: 'ERR_HOST_SHUTTING_DOWN',
  /** A malformed request: bad path parameter, query string, body on a route that takes none. */
  BAD_REQUEST: 'ERR_BAD_REQUEST',
  /** The body is not JSON. */
  BAD_JSON: 'ERR_BAD_JSON',
  /** The body is larger than the limit. */
  BODY_TOO_LARGE: 'ERR_BODY_TOO_LARGE',
  /** The body is not `application/json`. */
  UNSUPPORTED_MEDIA_TYPE: 'ERR_UNSUPPORTED_MEDIA_TYPE',
  /** No such route. */
  NO_ROUTE: 'ERR_NO_ROUTE',
  /** The route exists, not with this method. */
  METHOD_NOT_ALLOWED: 'ERR_METHOD_NOT_ALLOWED',
  /** A request from a browser page (Origin header) or for another Host (DNS rebinding). */
  FORBIDDEN: 'ERR_FORBIDDEN',
  /** Another live host listens on the socket path. */
  HOST_RUNNING: 'ERR_HOST_RUNNING',
  /** The socket path or listen address cannot be used. */
  BAD_ADDRESS: 'ERR_BAD_ADDRESS',
  /** The client found no host listening (no socket file, connection refused). */
  NO_HOST: 'ERR_NO_HOST',
  /** The host's answer was not what the control API promises. */
  BAD_RESPONSE: 'ERR_BAD_RESPONSE',
  /** The host did not answer in time. */
  TIMEOUT: 'ERR_TIMEOUT',
} as const;

export type HostErrorCode = (typeof HostErrorCode)[keyof typeof HostErrorCode];

export function hostError(code: HostErrorCode, message: string): VfioError {
  return new VfioError(code, message);
}

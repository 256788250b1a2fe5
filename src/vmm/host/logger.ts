/** Fields that go with a log line (VM name, error code, path, …). */
export type LogFields = Record<string, unknown>;

/**
 * Where a software host says what it does (VMs created, started, failed, the control server
 * listening, shutting down). The library never writes to the console; the CLI passes a logger that
 * does.
 */
export interface HostLogger {
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

/** A logger that drops everything (the default). */
export const silentLogger: HostLogger = {
  info: () => undefined,
  warn: () => undefined,
  error: () => undefined,
};

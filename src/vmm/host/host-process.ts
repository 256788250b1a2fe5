import { ControlServer, type ControlServerOptions } from './control-server.js';
import { defaultSocketPath, type ListenAddress, unixAddress } from './listen-address.js';
import { silentLogger } from './logger.js';
import { type ShutdownReport, SoftwareHost, type SoftwareHostOptions } from './software-host.js';

export interface RunSoftwareHostOptions extends SoftwareHostOptions {
  /** Default the UNIX socket `defaultSocketPath(name)`. */
  address?: ListenAddress;
  /** Aborting it shuts the host down (what SIGINT/SIGTERM do to `softvfio host`). */
  signal?: AbortSignal;
  server?: Omit<ControlServerOptions, 'logger' | 'onShutdownRequest'>;
}

/** A software host serving its control API: what one `softvfio host` process is. */
export interface RunningSoftwareHost {
  readonly host: SoftwareHost;
  readonly server: ControlServer;
  /** Where the control API listens (the port TCP picked, for port 0). */
  readonly address: ListenAddress;
  /** Settles once the host has shut down: by the signal, POST /shutdown or shutdown(). */
  readonly done: Promise<ShutdownReport>;
  /** Stop taking requests, stop and destroy every VM, close the server and remove its socket. */
  shutdown(): Promise<ShutdownReport>;
}

/**
 * Start a software host and its control server. Shutting down (any of the ways) stops the server
 * taking connections, lets requests in flight finish, stops and destroys every VM, and removes the
 * socket file; `done` then resolves with what was destroyed.
 */
export async function runSoftwareHost(options: RunSoftwareHostOptions): Promise<RunningSoftwareHost> {
  const logger = options.logger ?? silentLogger;
  const address = options.address ?? unixAddress(defaultSocketPath(options.name));
  const host = new SoftwareHost(options);
  if (options.signal?.aborted) throw options.signal.reason;
  let shutdown: Promise<ShutdownReport> | undefined;
  let resolveDone!: (report: ShutdownReport) => void;
  let rejectDone!: (err: unknown) => void;
  const done = new Promise<ShutdownReport>((resolve, reject) => {
    resolveDone = resolve;
    rejectDone = reject;
  });
  done.catch(() => undefined);
  const stop = (): Promise<ShutdownReport> => {
    shutdown ??= (async () => {
      options.signal?.removeEventListener('abort', stop);
      const [, report] = await Promise.all([server.close(), host.shutdown()]);
      logger.info(`host ${host.name} stopped: ${report.destroyed.length} VM(s) destroyed`, {
        destroyed: report.destroyed,
        errors: report.errors.length,
      });
      return report;
    })();
    shutdown.then(resolveDone, rejectDone);
    return shutdown;
  };
  const server: ControlServer = await ControlServer.listen(host, address, {
    ...options.server,
    logger,
    onShutdownRequest: () => void stop().catch(() => undefined),
  });
  options.signal?.addEventListener('abort', stop, { once: true });
  if (options.signal?.aborted) void stop();
  return { host, server, address: server.address, done, shutdown: stop };
}

import { VfioError } from '../uapi/error.js';
import { ControlClient } from '../vmm/host/control-client.js';
import type { ListenAddress } from '../vmm/host/listen-address.js';
import type { MigrationEvent, MigrationInfo } from '../vmm/migration/migration-info.js';
import type { IncomingParameters, MigrationParameters } from '../vmm/migration/migration-params.js';

/**
 * The migration routes of a host's control API, as the CLI uses them. `ControlClient` has these
 * methods with these signatures; the commands take this interface so tests can pass a fake.
 */
export interface MigrationHostApi {
  /** Make a created (not started) VM wait for an incoming migration; `listen` defaults to 127.0.0.1:0. */
  incoming(
    vm: string,
    body: { listen?: string; params?: Partial<IncomingParameters> },
  ): Promise<{ address: { host: string; port: number }; info: MigrationInfo }>;
  /** Start migrating a running VM to `uri` (`tcp:HOST:PORT`); returns at once, status 'setup'. */
  migrate(vm: string, body: { uri: string; params?: Partial<MigrationParameters> }): Promise<MigrationInfo>;
  /** The current or last migration of the VM, on whichever side it runs. */
  queryMigration(vm: string): Promise<MigrationInfo>;
  cancelMigration(vm: string): Promise<MigrationInfo>;
  /** The events of the VM's migration; the iteration ends after the 'end' event. */
  migrationEvents(vm: string, options?: { signal?: AbortSignal }): AsyncIterable<MigrationEvent>;
}

/** What `softvfio demo` asks of each host: the migration routes and the VM routes it drives. */
export type DemoHostApi = MigrationHostApi &
  Pick<ControlClient, 'createVm' | 'startVm' | 'stopVm' | 'vmStatus' | 'vmDigest'>;

const MIGRATION_METHODS = [
  'incoming',
  'migrate',
  'queryMigration',
  'cancelMigration',
  'migrationEvents',
] as const satisfies readonly (keyof MigrationHostApi)[];

/*
 * The migration routes of ControlClient are being written beside this CLI. Until they are in,
 * this check turns their absence into a clear error instead of "x is not a function"; once they
 * are, it always holds and `connectHost` can return the client directly (TypeScript then checks
 * the signatures against MigrationHostApi).
 */
function hasMigrationApi(client: ControlClient): client is ControlClient & MigrationHostApi {
  const methods = client as unknown as Record<string, unknown>;
  return MIGRATION_METHODS.every((m) => typeof methods[m] === 'function');
}

/** The control client of the host at `address`, with its migration routes. */
export function connectHost(address: ListenAddress): ControlClient & MigrationHostApi {
  const client = new ControlClient(address);
  if (!hasMigrationApi(client)) {
    throw new VfioError('ERR_UNSUPPORTED', 'this build of softvfio has no migration control API');
  }
  return client;
}

/** The migration URI of a listening address: `tcp:127.0.0.1:4444`, `tcp:[::1]:4444`. */
export function migrationUri(address: { host: string; port: number }): string {
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `tcp:${host}:${address.port}`;
}

import { ControlClient } from '../vmm/host/control-client.js';
import type { ListenAddress } from '../vmm/host/listen-address.js';
import type { MigrationEvent, MigrationInfo } from '../vmm/migration/migration-info.js';
import type { IncomingAnswer, IncomingRequest, MigrateRequest } from '../vmm/host/software-host.js';

/**
 * The migration routes of a host's control API, as the CLI uses them. `ControlClient` has these
 * methods with these signatures; the commands take this interface so tests can pass a fake.
 */
export interface MigrationHostApi {
  /** Make a created (not started) VM wait for an incoming migration; answers with the URI to migrate to. */
  incoming(vm: string, body: IncomingRequest): Promise<IncomingAnswer>;
  /** Start migrating a running VM to `uri` (`tcp:HOST:PORT`); returns at once, status 'setup'. */
  migrate(vm: string, body: MigrateRequest): Promise<MigrationInfo>;
  /** The current or last migration of the VM, on whichever side it runs. */
  queryMigration(vm: string): Promise<MigrationInfo>;
  cancelMigration(vm: string): Promise<MigrationInfo>;
  /** The events of the VM's migration; the iteration ends after the 'end' event. */
  migrationEvents(vm: string, options?: { signal?: AbortSignal }): AsyncIterable<MigrationEvent>;
}

/** What `softvfio demo` asks of each host: the migration routes and the VM routes it drives. */
export type DemoHostApi = MigrationHostApi &
  Pick<ControlClient, 'createVm' | 'startVm' | 'stopVm' | 'vmStatus' | 'vmDigest'>;

/** The control client of the host at `address` (it has the migration routes). */
export function connectHost(address: ListenAddress): ControlClient & MigrationHostApi {
  return new ControlClient(address);
}

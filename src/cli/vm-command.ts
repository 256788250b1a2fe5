import { open } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Command } from 'commander';
import { VfioError } from '../uapi/error.js';
import { ControlClient } from '../vmm/host/control-client.js';
import { MAX_REQUEST_BODY_BYTES, toJson } from '../vmm/host/control-protocol.js';
import { parseVmDefinition } from '../vmm/host/vm-definition.js';
import {
  Exit,
  hostTargetOptions,
  reportError,
  safeName,
  type TargetOptions,
  targetAddress,
} from './cli-common.js';
import type { CommandIo } from './conform-command.js';
import { renderDigest, renderVmInfo, renderVmList } from './vm-output.js';

export interface VmCommandOptions extends TargetOptions {
  json?: boolean;
}

export interface VmCreateOptions extends VmCommandOptions {
  name?: string;
}

const usage = (message: string) => new VfioError('ERR_USAGE', message);

/**
 * Read a VM definition file: at most MAX_REQUEST_BODY_BYTES, JSON, the name replaced if asked,
 * checked against the schema here (so a bad file is reported without a host).
 */
export async function readDefinitionFile(path: string, cwd: string, name?: string): Promise<unknown> {
  let text: string;
  try {
    const file = await open(resolve(cwd, path), 'r');
    try {
      const { size } = await file.stat();
      if (size > MAX_REQUEST_BODY_BYTES) {
        throw usage(`${path} is ${size} bytes; a VM definition is at most ${MAX_REQUEST_BODY_BYTES}`);
      }
      const buffer = Buffer.alloc(size);
      const { bytesRead } = await file.read(buffer, 0, size, 0);
      text = new TextDecoder('utf-8', { fatal: true }).decode(buffer.subarray(0, bytesRead));
    } finally {
      await file.close();
    }
  } catch (err) {
    if (err instanceof VfioError) throw err;
    throw usage(`cannot read ${path}: ${(err as Error).message}`);
  }
  let definition: unknown;
  try {
    definition = JSON.parse(text);
  } catch (err) {
    throw usage(`${path} is not JSON: ${(err as Error).message}`);
  }
  if (
    name !== undefined &&
    typeof definition === 'object' &&
    definition !== null &&
    !Array.isArray(definition)
  ) {
    definition = { ...definition, name };
  }
  parseVmDefinition(definition, path);
  return definition;
}

type VmAction = (client: ControlClient, io: CommandIo, json: boolean) => Promise<void>;

async function run(
  command: string,
  options: VmCommandOptions,
  io: CommandIo,
  action: VmAction,
): Promise<number> {
  const json = options.json ?? false;
  try {
    const client = new ControlClient(targetAddress(options));
    await action(client, io, json);
    return Exit.OK;
  } catch (err) {
    return reportError(io, command, json, err);
  }
}

/** `softvfio vm create FILE`: validate the file, create the VM on the host, print it. */
export function vmCreateCommand(file: string, options: VmCreateOptions, io: CommandIo): Promise<number> {
  return run('vm create', options, io, async (client, out, json) => {
    const definition = await readDefinitionFile(file, io.cwd, options.name);
    const vm = await client.createVm(definition);
    out.out(json ? toJson(vm, 2) : `created VM ${vm.name}\n${renderVmInfo(vm)}`);
  });
}

/** `softvfio vm start|stop|status|digest|destroy NAME`, `softvfio vm list`. */
export function vmCommand(
  verb: 'start' | 'stop' | 'status' | 'digest' | 'destroy' | 'list',
  name: string | undefined,
  options: VmCommandOptions,
  io: CommandIo,
): Promise<number> {
  return run(`vm ${verb}`, options, io, async (client, out, json) => {
    switch (verb) {
      case 'list': {
        const vms = await client.listVms();
        out.out(json ? toJson({ vms }, 2) : renderVmList(vms));
        return;
      }
      case 'digest': {
        const d = await client.vmDigest(name!);
        out.out(json ? toJson(d, 2) : renderDigest(d));
        return;
      }
      case 'destroy':
        await client.destroyVm(name!);
        out.out(json ? toJson({ name, destroyed: true }, 2) : `destroyed VM ${name}`);
        return;
      default: {
        const vm =
          verb === 'start'
            ? await client.startVm(name!)
            : verb === 'stop'
              ? await client.stopVm(name!)
              : await client.vmStatus(name!);
        const head = verb === 'status' ? '' : `${verb === 'start' ? 'started' : 'stopped'} VM ${vm.name}\n`;
        out.out(json ? toJson(vm, 2) : `${head}${renderVmInfo(vm)}`);
      }
    }
  });
}

function targetOptions(cmd: Command): Command {
  return hostTargetOptions(cmd).option('--json', 'print JSON instead of tables');
}

export function registerVmCommands(program: Command, io: CommandIo, setExit: (code: number) => void): void {
  const vm = program.command('vm').description('create and drive the VMs of a running software host');
  targetOptions(
    vm
      .command('create <file>')
      .description('create a VM from a JSON definition file (docs/VM-DEFINITION.md)')
      .option('--name <name>', 'the VM name, instead of the one in the file', safeName),
  ).action(async (file: string, options: VmCreateOptions) =>
    setExit(await vmCreateCommand(file, options, io)),
  );
  const verbs = [
    ['start', 'start a created VM or resume a stopped one'],
    ['stop', 'pause a running VM (vCPUs and device work)'],
    ['status', 'show a VM: state, RAM, vCPUs, devices'],
    ['digest', 'print the VM digest (guest RAM and device state)'],
    ['destroy', 'tear a VM down and forget it'],
  ] as const;
  for (const [verb, description] of verbs) {
    targetOptions(vm.command(`${verb} <name>`).description(description)).action(
      async (name: string, options: VmCommandOptions) => {
        try {
          safeName(name);
        } catch {
          setExit(
            reportError(
              io,
              `vm ${verb}`,
              options.json ?? false,
              usage(`bad VM name ${JSON.stringify(name)}`),
            ),
          );
          return;
        }
        setExit(await vmCommand(verb, name, options, io));
      },
    );
  }
  targetOptions(vm.command('list').description("list the host's VMs")).action(
    async (options: VmCommandOptions) => setExit(await vmCommand('list', undefined, options, io)),
  );
}

#!/usr/bin/env node
import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { ConformExit, type CommandIo, conformCommand } from './conform-command.js';
import { registerDemoCommand } from './demo-command.js';
import { processSignals, registerHostCommand } from './host-command.js';
import { type MigrationIo, registerMigrationCommands } from './migrate-command.js';
import { registerVmCommands } from './vm-command.js';

/** `softvfio`: a thin shell; each command is a library call plus output. */

function nonNegativeInt(value: string): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || !Number.isSafeInteger(n))
    throw new InvalidArgumentError('expected an integer >= 0');
  return n;
}

async function main(argv: readonly string[]): Promise<number> {
  let exitCode: number = ConformExit.OK;
  const io: CommandIo = {
    out: (text) => process.stdout.write(`${text}\n`),
    err: (text) => process.stderr.write(`${text}\n`),
    cwd: process.cwd(),
  };
  const setExit = (code: number) => {
    exitCode = code;
  };
  const program = new Command('softvfio')
    .description(
      'A software implementation of the Linux VFIO stack and of live migration with assigned devices',
    )
    .exitOverride()
    .showHelpAfterError();
  program
    .command('conform')
    .description('run the migration conformance kit on the registered sample devices')
    .option('--device <name>', 'check only this device type')
    .option('--json', 'print one JSON document instead of tables')
    .option('--runs <n>', 'model-based random sequences per device', nonNegativeInt)
    .option('--seed <n>', 'seed for device instances and random sequences', nonNegativeInt)
    .option('--module <path>', 'check the device factories an ES module exports instead of the registry')
    .action(async (options) => {
      exitCode = await conformCommand(options, io);
    });
  registerHostCommand(program, { ...io, onSignals: processSignals }, setExit);
  registerVmCommands(program, io, setExit);
  const migrationIo: MigrationIo = {
    ...io,
    onSignals: processSignals,
    isTTY: process.stderr.isTTY === true,
    progressStream: process.stderr,
  };
  registerMigrationCommands(program, migrationIo, setExit);
  registerDemoCommand(program, migrationIo, setExit);
  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (error) {
    if (error instanceof CommanderError) return error.exitCode === 0 ? 0 : ConformExit.USAGE;
    throw error;
  }
  return exitCode;
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    process.stderr.write(
      `softvfio: internal error: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`,
    );
    process.exitCode = 70;
  },
);

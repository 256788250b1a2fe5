import { DMA_ENTRY_LIMIT_DEFAULT } from '../../uapi/vfio-type1.js';
import { kernelError, VfioError } from '../../uapi/error.js';
import { Cgroup } from './cgroup.js';
import { MemFile, type MemFileOptions, type OpenFile } from './memfd.js';
import { Mm, type MmapArgs } from './mm.js';

export type Capability = 'CAP_IPC_LOCK' | 'CAP_SYS_RESOURCE';

/** RLIM_INFINITY. */
export const RLIM_INFINITY = (1n << 64n) - 1n;
/** Default RLIMIT_MEMLOCK of a fresh process (8 MiB, as systemd sets it). */
export const DEFAULT_MEMLOCK_BYTES = 8n * 1024n * 1024n;

/** A uid's `user_struct`: the per-user pinned-page counter iommufd charges by default. */
export class User {
  readonly uid: number;
  /** `user->locked_vm` (pages). */
  lockedVm = 0;
  constructor(uid: number) {
    this.uid = uid;
  }
}

/**
 * Kernel module parameters of a host (`/sys/module/<module>/parameters/*`). Like the 0644 params
 * they stand for, they may be changed at any time; each is read where the kernel reads it.
 */
export interface HostModules {
  vfioIommuType1: {
    /**
     * `vfio_iommu_type1.dma_entry_limit` (uint, default U16_MAX = 65535): most vfio_dma mappings
     * per container. Read when a container's IOMMU is set (its `dma_avail` starts there).
     */
    dmaEntryLimit: number;
  };
}

export interface HostOptions {
  modules?: { vfioIommuType1?: Partial<HostModules['vfioIommuType1']> };
}

export interface SpawnOptions {
  uid?: number;
  rlimitMemlockBytes?: bigint;
  caps?: Iterable<Capability>;
  /**
   * softvfio extension: the cgroup to start in, as an object or an absolute path (default the root
   * cgroup). A path that does not exist or a removed cgroup -> ENOENT; another host's -> EINVAL.
   */
  cgroup?: Cgroup | string;
}

/** A process: pid, uid, capabilities, RLIMIT_MEMLOCK, a cgroup, an mm and an fd table. */
export class Process {
  readonly host: Host;
  readonly pid: number;
  readonly user: User;
  readonly caps: Set<Capability>;
  rlimitMemlockBytes: bigint;
  #mm: Mm;
  #cgroup: Cgroup;
  #fds = new Map<number, OpenFile>();
  #alive = true;

  /** `options.cgroup` is ignored here: `cgroup` is the resolved one (Host.spawn, fork). */
  constructor(
    host: Host,
    pid: number,
    user: User,
    options: SpawnOptions,
    mm = new Mm(),
    cgroup: Cgroup = host.rootCgroup,
  ) {
    this.host = host;
    this.pid = pid;
    this.user = user;
    this.caps = new Set(options.caps ?? []);
    this.rlimitMemlockBytes = options.rlimitMemlockBytes ?? DEFAULT_MEMLOCK_BYTES;
    this.#mm = mm;
    this.#cgroup = cgroup;
  }

  get uid(): number {
    return this.user.uid;
  }
  get mm(): Mm {
    return this.#mm;
  }
  /**
   * softvfio extension: the cgroup this process belongs to (its last one once exited). Moved with
   * `cgroup.attach(process)`; inherited by fork, kept by exec.
   */
  get cgroup(): Cgroup {
    return this.#cgroup;
  }
  /** @internal `Cgroup.attach` does the checks. */
  setCgroup(cgroup: Cgroup): void {
    this.#cgroup = cgroup;
  }
  get alive(): boolean {
    return this.#alive;
  }
  /** RLIMIT_MEMLOCK in pages, as `rlimit(RLIMIT_MEMLOCK) >> PAGE_SHIFT`. */
  get memlockLimitPages(): number {
    return Number(this.rlimitMemlockBytes >> 12n);
  }

  hasCap(cap: Capability): boolean {
    return this.caps.has(cap);
  }

  #live(op: string): void {
    if (!this.#alive) throw new VfioError('ERR_PROCESS_EXITED', `process ${this.pid} has exited`, { op });
  }

  /**
   * mmap(): anonymous memory, or with `fd` a shared mapping of that open memfd from offset 0
   * (MAP_SHARED; EBADF if not open, EACCES for a writable mapping of a file opened read-only).
   */
  mmap(args: MmapArgs & { fd?: number }): bigint {
    this.#live('mmap');
    if (args.fd === undefined) return this.#mm.mmap(args);
    const open = this.#fds.get(args.fd);
    if (!open) throw kernelError('EBADF', `fd ${args.fd} not open`, { op: 'mmap' });
    if ((args.writable ?? true) && !open.writable) {
      throw kernelError('EACCES', 'writable shared mapping of a file opened read-only', { op: 'mmap' });
    }
    const { fd: _fd, ...rest } = args;
    return this.#mm.mmap({ ...rest, file: open.file });
  }
  munmap(va: bigint, lengthBytes: bigint | number): void {
    this.#mm.munmap(va, lengthBytes);
  }
  read(va: bigint, target: Uint8Array): void {
    this.#mm.read(va, target);
  }
  write(va: bigint, data: Uint8Array): void {
    this.#mm.write(va, data);
  }

  /**
   * memfd_create + ftruncate: a new file open read-write; returns the fd. Lazily backed, or backed
   * by `options.memory` (a PhysMemory of exactly that size: see MemFileOptions).
   */
  memfdCreate(sizeBytes: bigint | number, name?: string, options: MemFileOptions = {}): number {
    this.#live('memfd_create');
    return this.installFd({ file: new MemFile(BigInt(sizeBytes), name, options), writable: true });
  }

  /** Installs an open file (received over SCM_RIGHTS, opened read-only, …) at the lowest free fd. */
  installFd(open: OpenFile): number {
    let fd = 3;
    while (this.#fds.has(fd)) fd++;
    this.#fds.set(fd, open);
    return fd;
  }

  file(fd: number): OpenFile | undefined {
    return this.#fds.get(fd);
  }

  closeFd(fd: number): void {
    if (!this.#fds.delete(fd)) throw kernelError('EBADF', `fd ${fd} not open`, { op: 'close' });
  }

  /**
   * fork(): a child with the same uid, caps, limit, cgroup, open files and a private copy of the
   * mm (whose locked_vm/pinned_vm start at 0).
   */
  fork(): Process {
    this.#live('fork');
    const child = this.host.adopt(
      (pid) =>
        new Process(
          this.host,
          pid,
          this.user,
          { caps: this.caps, rlimitMemlockBytes: this.rlimitMemlockBytes },
          this.#mm.clone(),
          this.#cgroup,
        ),
    );
    for (const [fd, open] of this.#fds) child.#fds.set(fd, open);
    return child;
  }

  /**
   * exec(): same pid, files and cgroup, a brand-new empty mm (locked_vm 0); the old one is gone
   * for new pins.
   */
  exec(): void {
    this.#live('exec');
    this.#mm.alive = false;
    this.#mm = new Mm();
  }

  /** exit(): the mm dies (pins already taken stay valid), files close, the pid is released. */
  exit(): void {
    if (!this.#alive) return;
    this.#alive = false;
    this.#mm.alive = false;
    this.#fds.clear();
    this.host.reap(this);
  }
}

/** A software host: users by uid, processes by pid, and (softvfio extension) a cgroup tree. */
export class Host {
  readonly modules: HostModules;
  /** softvfio extension: the root of the cgroup tree ('/'), where processes start by default. */
  readonly rootCgroup: Cgroup;
  readonly #users = new Map<number, User>();
  readonly #processes = new Map<number, Process>();
  #nextPid = 1000;

  constructor(options: HostOptions = {}) {
    this.modules = {
      vfioIommuType1: { dmaEntryLimit: DMA_ENTRY_LIMIT_DEFAULT, ...options.modules?.vfioIommuType1 },
    };
    this.rootCgroup = new Cgroup(this, '', undefined);
  }

  /**
   * softvfio extension: the cgroup at an absolute `path` ('/', '/machine/vm1'). EINVAL if the path
   * is not absolute, ENOENT if a component does not exist.
   */
  cgroup(path: string): Cgroup {
    if (!path.startsWith('/')) throw kernelError('EINVAL', `cgroup path '${path}' is not absolute`);
    let at = this.rootCgroup;
    for (const name of path.split('/')) {
      if (name === '') continue;
      const next = at.child(name);
      if (!next) throw kernelError('ENOENT', `no cgroup ${path}`);
      at = next;
    }
    return at;
  }

  user(uid: number): User {
    let user = this.#users.get(uid);
    if (!user) {
      user = new User(uid);
      this.#users.set(uid, user);
    }
    return user;
  }

  process(pid: number): Process | undefined {
    return this.#processes.get(pid);
  }

  get processes(): IterableIterator<Process> {
    return this.#processes.values();
  }

  spawn(options: SpawnOptions = {}): Process {
    const cgroup = this.#resolveCgroup(options.cgroup);
    const user = this.user(options.uid ?? 1000);
    return this.adopt((pid) => new Process(this, pid, user, options, new Mm(), cgroup));
  }

  #resolveCgroup(cgroup: Cgroup | string | undefined): Cgroup {
    if (cgroup === undefined) return this.rootCgroup;
    if (typeof cgroup === 'string') return this.cgroup(cgroup);
    if (cgroup.host !== this) throw kernelError('EINVAL', `cgroup ${cgroup.path} is on another host`);
    if (cgroup.removed) throw kernelError('ENOENT', `cgroup ${cgroup.path} was removed`);
    return cgroup;
  }

  /** @internal allocates a pid and registers the process `make` builds. */
  adopt(make: (pid: number) => Process): Process {
    const pid = this.#nextPid++;
    const process = make(pid);
    this.#processes.set(pid, process);
    return process;
  }

  /** @internal */
  reap(process: Process): void {
    this.#processes.delete(process.pid);
  }
}

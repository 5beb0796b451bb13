"""The degrees of parallelism and the device meshes built from them.

World ranks are laid out row-major over (dp_replicate, dp_shard, cp): the cp ranks of one
sequence are neighbours, so on one host they share the fastest links. With Ulysses the cp
dimension is itself split row-major into (cp_ring, ulysses): a Ulysses group is `ulysses` adjacent
ranks, inside one node when the node's process count is a multiple of it, and the ring (or
all-gather) runs between the groups, across nodes when cp spans several.
"""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from titan_cp.errors import UserError


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    world_size: int
    ulysses: int = 1

    @classmethod
    def from_config(cls, parallelism, world_size: int, processes_per_node: int | None = None) -> "ParallelDims":
        """Resolve `data_parallel_shard_degree = -1` and check that the degrees fill the world.

        `processes_per_node` (torchrun's LOCAL_WORLD_SIZE; None: one node) places the Ulysses groups.
        """
        dp_replicate = parallelism.data_parallel_replicate_degree
        cp = parallelism.context_parallel_degree
        dp_shard = parallelism.data_parallel_shard_degree
        ulysses = parallelism.context_parallel_ulysses_degree
        # Each degree's own range (>= 1; -1 or >= 1 for dp_shard) is checked by the config loader.
        if dp_shard == -1:
            if world_size % (dp_replicate * cp) != 0:
                raise UserError(
                    f"world size {world_size} is not divisible by parallelism.data_parallel_replicate_degree"
                    f" {dp_replicate} x parallelism.context_parallel_degree {cp}"
                )
            dp_shard = world_size // (dp_replicate * cp)
        if dp_replicate * dp_shard * cp != world_size:
            raise UserError(
                f"parallelism degrees dp_replicate {dp_replicate} x dp_shard {dp_shard} x cp {cp}"
                f" = {dp_replicate * dp_shard * cp}, but the world size is {world_size} (NGPU);"
                " they must be equal"
            )
        _check_ulysses(ulysses, cp, processes_per_node or world_size)
        return cls(dp_replicate, dp_shard, cp, world_size, ulysses)

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different samples."""
        return self.dp_replicate * self.dp_shard

    def dp_rank(self, rank: int) -> int:
        """The data-loading rank of a world rank: all cp ranks of one group share it."""
        return rank // self.cp

    @property
    def uses_fsdp(self) -> bool:
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    def build_meshes(self, device_type: str) -> "Meshes":
        world = init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.cp),
            mesh_dim_names=("dp_replicate", "dp_shard", "cp"),
        )
        # FSDP shards over dp_shard x cp. Because the layout is row-major, a second mesh of shape
        # (dp_replicate, dp_shard * cp) holds exactly those ranks; building it with the public
        # init_device_mesh avoids DeviceMesh's private _flatten.
        if self.dp_replicate > 1:
            fsdp = init_device_mesh(
                device_type,
                (self.dp_replicate, self.dp_shard * self.cp),
                mesh_dim_names=("dp_replicate", "dp_shard_cp"),
            )
        else:
            fsdp = init_device_mesh(device_type, (self.dp_shard * self.cp,), mesh_dim_names=("dp_shard_cp",))
        return Meshes(cp=self._cp_mesh(world, device_type), fsdp=fsdp)

    def _cp_mesh(self, world: DeviceMesh, device_type: str) -> DeviceMesh | None:
        """The cp ranks of this rank's sequence: 1-D ("cp"), or 2-D ("cp_ring", "ulysses")."""
        if self.cp == 1:
            return None
        if self.ulysses == 1:
            return world["cp"]
        # The same row-major ranks with cp split in two, so cp rank = ring rank * ulysses + ulysses rank.
        split = init_device_mesh(
            device_type,
            (self.dp_replicate * self.dp_shard, self.cp // self.ulysses, self.ulysses),
            mesh_dim_names=("dp", "cp_ring", "ulysses"),
        )
        return split["cp_ring", "ulysses"]


def _check_ulysses(ulysses: int, cp: int, processes_per_node: int) -> None:
    key = "parallelism.context_parallel_ulysses_degree"
    if cp % ulysses:
        raise UserError(
            f"{key} {ulysses} must divide parallelism.context_parallel_degree {cp}"
            " (the rest of cp is the ring part)"
        )
    if processes_per_node % ulysses:
        raise UserError(
            f"{key} {ulysses} cannot place its groups on nodes of {processes_per_node} processes:"
            " a Ulysses group is that many adjacent ranks on one node, so it must divide the processes"
            " per node (torchrun --nproc-per-node, NGPU)"
        )


@dataclass
class Meshes:
    """The meshes the trainer uses, views of one world mesh with dims (dp_replicate, dp_shard, cp).

    `fsdp` shards over dp_shard x cp (HSDP: replicate x that). `cp` is None at cp = 1, 1-D ("cp") without Ulysses and 2-D ("cp_ring", "ulysses") with it.
    """

    cp: DeviceMesh | None
    fsdp: DeviceMesh

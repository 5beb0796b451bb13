"""The degrees of parallelism and the device meshes built from them.

World ranks are laid out row-major over (dp_replicate, dp_shard, cp): the cp ranks of one
sequence are neighbours, so on one host they share the fastest links. With Ulysses the cp
dimension is itself split row-major into (cp_ring, ulysses): a Ulysses group is `ulysses` adjacent
ranks, inside one node when the node's process count is a multiple of it, and the ring (or
all-gather) runs between the groups, across nodes when cp spans several.

FSDP's shard group is dp_shard x cp adjacent ranks. When it spans several nodes,
`parallelism.fsdp_shard_within_node` (on by default) shards over the ranks of one node and
replicates across nodes (HSDP), so the per-block all-gathers and reduce-scatters stay on the
node's links and only the gradient all-reduce crosses nodes (docs/parallelism.md).
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
    ulysses: int
    fsdp_shard: int  # ranks FSDP shards each parameter over: dp_shard x cp, or one node's share

    @classmethod
    def from_config(cls, parallelism, world_size: int, processes_per_node: int | None = None) -> "ParallelDims":
        """Resolve `data_parallel_shard_degree = -1` and check that the degrees fill the world.

        `processes_per_node` (torchrun's LOCAL_WORLD_SIZE; None: one node) places the Ulysses groups
        and, with parallelism.fsdp_shard_within_node, FSDP's shard groups.
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
        fsdp_shard = dp_shard * cp
        if parallelism.fsdp_shard_within_node:
            fsdp_shard = node_local_shard(fsdp_shard, processes_per_node or world_size)
        return cls(dp_replicate, dp_shard, cp, world_size, ulysses, fsdp_shard)

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

    @property
    def fsdp_group(self) -> int:
        """dp_shard x cp: the ranks FSDP shards over unless kept inside a node."""
        return self.dp_shard * self.cp

    @property
    def fsdp_replicate(self) -> int:
        """Copies of each parameter shard: dp_replicate, times the nodes a shard group spans."""
        return self.world_size // self.fsdp_shard

    def describe_fsdp(self) -> str:
        """One line's worth: what FSDP shards and replicates over."""
        text = f"FSDP shards over {self.fsdp_shard} rank{'s' if self.fsdp_shard > 1 else ''}"
        if self.fsdp_shard < self.fsdp_group:
            text += f" (one node's share of dp_shard x cp = {self.fsdp_group})"
        if self.fsdp_replicate > 1:
            text += f", replicated {self.fsdp_replicate}x (HSDP)"
        return text

    def wider_sharding_lever(self) -> str:
        """With node-local sharding narrower than dp_shard x cp, sharding across nodes lowers the
        model state per rank: named first when a run does not fit ("" otherwise)."""
        if self.fsdp_shard == self.fsdp_group:
            return ""
        return (
            f"parallelism.fsdp_shard_within_node false (FSDP shards over all {self.fsdp_group} ranks of"
            f" dp_shard x cp instead of one node's {self.fsdp_shard}; its traffic then crosses nodes)"
        )

    def build_meshes(self, device_type: str) -> "Meshes":
        world = init_device_mesh(
            device_type,
            (self.dp_replicate, self.dp_shard, self.cp),
            mesh_dim_names=("dp_replicate", "dp_shard", "cp"),
        )
        return Meshes(cp=self._cp_mesh(world, device_type), fsdp=self._fsdp_mesh(device_type))

    def _fsdp_mesh(self, device_type: str) -> DeviceMesh:
        """1-D ("shard",), or 2-D ("replicate", "shard") for HSDP.

        A shard group is `fsdp_shard` adjacent ranks (all of dp_shard x cp, or one node's share of
        it), so a row-major mesh of shape (replicate, shard) holds exactly those groups; building it
        with the public init_device_mesh avoids DeviceMesh's private _flatten.
        """
        if self.fsdp_replicate == 1:
            return init_device_mesh(device_type, (self.fsdp_shard,), mesh_dim_names=("shard",))
        return init_device_mesh(
            device_type, (self.fsdp_replicate, self.fsdp_shard), mesh_dim_names=("replicate", "shard")
        )

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


def node_local_shard(group: int, processes_per_node: int) -> int:
    """The FSDP shard degree that keeps the shards of each group of `group` adjacent ranks on one node."""
    if processes_per_node % group == 0:  # whole groups fit in a node: nothing to change
        return group
    if group % processes_per_node == 0:  # a group spans whole nodes: shard within each
        return processes_per_node
    raise UserError(
        f"parallelism.fsdp_shard_within_node cannot keep FSDP's shard group (dp_shard x cp = {group}"
        f" ranks) on nodes of {processes_per_node} processes: one must divide the other;"
        " set it to false to shard over the whole group across nodes"
    )


@dataclass
class Meshes:
    """The meshes the trainer uses, over the ranks laid out row-major as (dp_replicate, dp_shard, cp).

    `fsdp` shards over `ParallelDims.fsdp_shard` adjacent ranks (dp_shard x cp, or one node's share
    of it) and replicates over the rest (HSDP). `cp` is None at cp = 1, 1-D ("cp") without Ulysses
    and 2-D ("cp_ring", "ulysses") with it.
    """

    cp: DeviceMesh | None
    fsdp: DeviceMesh

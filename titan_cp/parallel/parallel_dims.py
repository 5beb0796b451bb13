"""The degrees of parallelism and the device meshes built from them.

World ranks are laid out row-major over (dp_replicate, dp_shard, cp): the cp ranks of one
sequence are neighbours, so on one host they share the fastest links.
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

    @classmethod
    def from_config(cls, parallelism, world_size: int) -> "ParallelDims":
        """Resolve `data_parallel_shard_degree = -1` and check that the degrees fill the world."""
        dp_replicate = parallelism.data_parallel_replicate_degree
        cp = parallelism.context_parallel_degree
        dp_shard = parallelism.data_parallel_shard_degree
        for key, value in (
            ("data_parallel_replicate_degree", dp_replicate),
            ("context_parallel_degree", cp),
        ):
            if value < 1:
                raise UserError(f"parallelism.{key} = {value}: must be >= 1")
        if dp_shard == -1:
            if world_size % (dp_replicate * cp) != 0:
                raise UserError(
                    f"world size {world_size} is not divisible by parallelism.data_parallel_replicate_degree"
                    f" {dp_replicate} x parallelism.context_parallel_degree {cp}"
                )
            dp_shard = world_size // (dp_replicate * cp)
        elif dp_shard < 1:
            raise UserError(f"parallelism.data_parallel_shard_degree = {dp_shard}: must be -1 or >= 1")
        if dp_replicate * dp_shard * cp != world_size:
            raise UserError(
                f"parallelism degrees dp_replicate {dp_replicate} x dp_shard {dp_shard} x cp {cp}"
                f" = {dp_replicate * dp_shard * cp}, but the world size is {world_size} (NGPU);"
                " they must be equal"
            )
        return cls(dp_replicate, dp_shard, cp, world_size)

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
        return Meshes(world=world, cp=world["cp"] if self.cp > 1 else None, fsdp=fsdp)


@dataclass
class Meshes:
    """`world` has dims (dp_replicate, dp_shard, cp); the loss reduces over all of it (dp x cp)."""

    world: DeviceMesh
    cp: DeviceMesh | None
    fsdp: DeviceMesh

"""Everything that faces the cluster: ``submit`` (resources checked, the job script rendered and
sbatch'ed), ``sweep`` (tasks of a grid, their run directories, the job's ``finish`` step),
``failure_requeue`` (a dead or hung rank requeues its job) and ``shared_fs`` (a multi-node run
directory must be on a file system every node sees). The job script is slurm/job.sbatch; the local
clusters the tests run on are slurm/local_cluster.sh and slurm/netns_nodes.sh."""

# Source this in every shell that uses the cluster of slurm/local/start.sh:  . slurm/local/env.sh
# Without SLURM_CONF the clients look for /etc/slurm/slurm.conf, then try DNS (configless).
export MNIST_ADD_SLURM_DIR=${MNIST_ADD_SLURM_DIR:-/tmp/mnist-add-slurm}
export SLURM_CONF=$MNIST_ADD_SLURM_DIR/etc/slurm.conf

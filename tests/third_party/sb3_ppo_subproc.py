"""PPO on CartPole with Stable-Baselines3, its environments stepped in child processes
(SubprocVecEnv), as SB3's multiprocessing example writes it:
https://stable-baselines3.readthedocs.io/en/master/guide/examples.html#multiprocessing-unleashing-the-power-of-vectorized-environments

Changed from the example: 2 environments instead of 4 and a few thousand steps with short
rollouts, so a run takes seconds. Nothing here imports marlwatch.
"""

from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

if __name__ == "__main__":
    env_id = "CartPole-v1"
    num_cpu = 2  # Number of processes to use
    # Create the vectorized environment
    vec_env = make_vec_env(env_id, n_envs=num_cpu, seed=0, vec_env_cls=SubprocVecEnv)

    model = PPO("MlpPolicy", vec_env, n_steps=128, batch_size=64, n_epochs=4, seed=0, verbose=1)
    model.learn(total_timesteps=1_024)
    vec_env.close()

#!/bin/sh
# Commands of `embedlens reproduce`, in order; each line's comment says its state.

# stats: finished earlier
embedlens stats /tmp/rep_smoke/images --out /tmp/rep_smoke/out/stats --model embedlens-mini --profile paper --no-progress --device cpu

# original__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args pretrained=embedlens-mini,profile=paper,device=cpu --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/original__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# original__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args pretrained=embedlens-mini,profile=paper,device=cpu --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/original__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_llm_sink__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:llm_sink,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_llm_sink__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_llm_sink__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:llm_sink,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_llm_sink__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_vit_sink__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:vit_sink,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_vit_sink__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_vit_sink__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:vit_sink,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_vit_sink__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_sinks__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_sinks__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_sinks__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_sinks__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_dead__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:dead,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_dead__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_dead__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:dead,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_dead__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_sink_plus_dead__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink+dead,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_sink_plus_dead__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# prune_sink_plus_dead__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink+dead,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/prune_sink_plus_dead__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# random_seed0__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink+dead,select=matched_random,seed=0,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/random_seed0__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# random_seed0__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink+dead,select=matched_random,seed=0,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/random_seed0__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# random_seed1__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink+dead,select=matched_random,seed=1,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/random_seed1__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# random_seed1__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="prune:sink+dead,select=matched_random,seed=1,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/random_seed1__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_llm_sink_1.5__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:llm_sink@1.5,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_llm_sink_1.5__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_llm_sink_1.5__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:llm_sink@1.5,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_llm_sink_1.5__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_llm_sink_0.5_1__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:llm_sink@0.5,1,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_llm_sink_0.5_1__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_llm_sink_0.5_1__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:llm_sink@0.5,1,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_llm_sink_0.5_1__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_llm_sink_0.5_1.5__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:llm_sink@0.5-1.5,match=member"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_llm_sink_0.5_1.5__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_llm_sink_0.5_1.5__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:llm_sink@0.5-1.5,match=member"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_llm_sink_0.5_1.5__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_alive_1.5__General: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:alive@1.5"' --tasks tinyrep --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_alive_1.5__General/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# skip_alive_1.5__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="skip:alive@1.5"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/skip_alive_1.5__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# inject_8__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="inject@8"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/inject_8__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks

# scale_0.01__CV_centric: finished earlier
python -m lmms_eval eval --model embedlens --model_args 'pretrained=embedlens-mini,profile=paper,device=cpu,interventions="scale:0.01"' --tasks tinyrep_cv --batch_size 1 --output_path /tmp/rep_smoke/out/runs/scale_0.01__CV_centric/lmms --log_samples --limit 2 --include_path /tmp/rep_smoke/tasks
